"""Hot-spot kernels for kimi_train, each behind one function with a PyTorch reference."""
