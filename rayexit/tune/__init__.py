"""Ray Tune + Optuna over training settings, threshold search on cached logits, Pareto front, export."""
