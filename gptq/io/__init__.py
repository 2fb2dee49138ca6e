"""Modules and bytes: module helpers and hooks, safetensors files. Nothing about quantization."""
