"""The toy world: small local checkpoints for the demo, the tests and the benchmarks.

``corpus`` (the chat corpus), ``world`` (an SFT/DPO pair trained on it, the polite reward),
``agent`` (the MARA agent trained on the SFT model), ``shipped`` (both as shipped in
``assets/``), ``mara`` (the agent's runs through the engine), ``models`` (the tokenizer,
the Llama builder, random-weight pairs and agents), ``cache`` (their stamped build cache).
"""
