"""nn.Modules built on the ops: LoRALinear, prefix and prompt encoders. Nothing here imports
transformers."""
