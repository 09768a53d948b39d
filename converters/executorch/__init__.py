"""The ExecuTorch backend (torch.export -> XNNPACK-delegated .pte, shared .ptd weights)."""
