"""What every model family shares: the config base, norms, rotary embedding, DeepSeekMoE (router, grouped experts,
shared experts), the fused output head, the DecoderLM interface and the ModelSpec."""
