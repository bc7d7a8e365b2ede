"""Small pieces every training stage shares: run logs, atomic checkpoints, safetensors export, early stop."""
