"""Configuration of an exported memgpt-dist model (Hugging Face remote code; imports transformers only).

The fields are memgpt-dist's `ModelConfig` and `MemoryConfig` (memory ones prefixed `mem_`), under
their own names; `attribute_map` gives the names transformers and its tools look for.
"""
from transformers import PretrainedConfig


class MemGPTConfig(PretrainedConfig):
    model_type = "memgpt"
    attribute_map = {"hidden_size": "n_embd", "num_hidden_layers": "n_layer", "num_attention_heads": "n_head",
                     "num_key_value_heads": "n_kv_head", "intermediate_size": "mlp_hidden"}

    def __init__(self, vocab_size=4096, n_layer=2, n_head=4, n_embd=128, segment_len=64, position="rope",
                 rope_theta=10000.0, mlp_ratio=4, bias=True, mem_enabled=True, mem_kind="head", mem_nu=3,
                 mem_eps=1e-5, mem_conv=4, use_cache=True, n_kv_head=None, norm="layernorm", norm_eps=1e-5,
                 mlp="gelu", mlp_hidden=None, attention="segment", mem_decay=False, mem_layers=None, **kwargs):
        self.vocab_size = vocab_size
        self.n_layer = n_layer
        self.n_head = n_head
        self.n_embd = n_embd
        self.segment_len = segment_len
        self.position = position
        self.rope_theta = rope_theta
        self.mlp_ratio = mlp_ratio
        self.bias = bias
        self.mem_enabled = mem_enabled
        self.mem_kind = mem_kind
        self.mem_nu = mem_nu
        self.mem_eps = mem_eps
        self.mem_conv = mem_conv
        self.use_cache = use_cache
        # modern blocks; mlp_hidden is the resolved width (ModelConfig.mlp_hidden_size)
        self.n_kv_head = n_kv_head or n_head
        self.norm = norm
        self.norm_eps = norm_eps
        self.mlp = mlp
        self.mlp_hidden = mlp_hidden or mlp_ratio * n_embd
        # issue 15: 'segment' | 'window' | 'full' attention; the memory's forgetting gate
        self.attention = attention
        self.mem_decay = mem_decay
        # the blocks that have the memory (memory.layers, resolved to indices); None: every block
        self.mem_layers = list(mem_layers) if mem_layers is not None else None
        kwargs.setdefault("tie_word_embeddings", True)
        super().__init__(**kwargs)

    @property
    def head_dim(self):
        return self.n_embd // self.n_head

    def has_memory(self, layer):
        """Whether block `layer` has the memory (memgpt_dist's MemoryConfig.has_memory)."""
        return bool(self.mem_enabled) and (self.mem_layers is None or layer in self.mem_layers)
