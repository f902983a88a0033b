"""The diffusion models: loading, what differs between families (UNet / flow), LoRA, sharding, real-size architectures."""
