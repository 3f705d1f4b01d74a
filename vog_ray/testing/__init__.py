"""What only tests, benches and the demo use: writers of small splits in every input format
(``vog_ray.testing.writers``). The audit itself never imports this package."""
