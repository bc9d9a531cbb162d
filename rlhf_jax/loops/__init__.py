"""Host loops: the only impure code (data feeding, jit, logging, checkpoints, reports)."""
