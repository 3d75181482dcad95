"""The Fashion-MNIST demo: teacher, student alone and FitNet trained through the engine on real data, and its
report (table, JSON, accuracy plot)."""
