"""Compression methods: one file per method, each registered by name (see compress.pipeline.method)."""
