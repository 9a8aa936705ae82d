"""The PEFT side of eva: which layers are targets, the PEFT-compatible input functions, and
loading an EVA state dict into a ``PeftModel``'s LoRA layers."""
