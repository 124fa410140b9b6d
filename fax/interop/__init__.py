"""Hugging Face interop: configs, safetensors weights, tokenizers (import for init_from=hf:DIR, export)."""
