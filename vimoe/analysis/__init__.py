"""Routing analysis and pictures: expert maps for segmentation (expert_maps.py)."""
