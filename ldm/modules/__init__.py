"""Network modules of the diffusion stage: attention, the UNet, text encoders and EMA (SD's layout)."""
