"""Paper figure scripts: each reads saved results of its preset's runs and draws, never computes."""
