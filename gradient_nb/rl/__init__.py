"""Echo: RL post-training with samplers on the mesh decoupled from the trainer (GRPO over LoRA)."""
