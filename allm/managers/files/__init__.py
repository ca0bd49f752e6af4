"""Model file sniffing and header reading (GGUF, safetensors, ggml, CTranslate2), shared by the managers."""
