"""The toy world (``corpus``, ``world``, ``agent``; as shipped: ``shipped``) and the small
local checkpoints of the tests and benchmarks (``models``), cached by ``cache``."""
