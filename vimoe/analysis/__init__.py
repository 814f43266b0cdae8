"""Routing analysis and pictures: expert maps for segmentation (expert_maps.py); per-layer class x expert routing,
specialisation scores, routing degree and which MoE layers to keep (routing.py)."""
