"""Downstream pipelines that take an E2-wrapped (or any) CLIP as their encoder."""
