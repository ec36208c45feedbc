"""The converter: hub or local Qwen2.5-VL checkpoint -> self-contained MLX model folder (mimo_mlx.convert)."""
