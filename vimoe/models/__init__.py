"""Models: ViT / ViMoE (vit.py), decoder LMs: Transformer with MoE FFNs and UMoE (lm.py), Shazeer et al. 2017's
LSTM-MoE language model (lstm.py), segmentation on a ViT (segmentation.py). Shared pieces: config helpers
(config_utils.py), parameters by path (params.py), position-embedding resampling (posemb.py).

Every model exposes `backbone` (the ViT inside a segmentation model, else the model), `depth` and
`layer_id(path)` (0 embeddings, i+1 block i, depth+1 the rest: layer-wise lr decay).

    from vimoe.models import build_vit
    model = build_vit(config.model, rngs=nnx.Rngs(0))
    logits, aux = model(images, deterministic=False)   # images [B, H, W, 3]
"""

from vimoe.models.config_utils import parse_moe_layers
from vimoe.models.lm import LanguageModel, LMConfig, build_lm, generate, lm_config
from vimoe.models.lstm import LstmMoeConfig, LstmMoeLM, build_lstm_lm, lstm_config
from vimoe.models.params import activated_params, assign_params, count_params, flat_params
from vimoe.models.posemb import bicubic_resize_matrix, resize_position_grid
from vimoe.models.vit import VARIANTS, ViT, ViTConfig, build_vit, moe_blocks, vit_config

__all__ = [
    "LMConfig", "LanguageModel", "build_lm", "generate", "lm_config",
    "VARIANTS", "ViT", "ViTConfig", "activated_params", "assign_params", "bicubic_resize_matrix",
    "build_vit", "count_params", "flat_params", "moe_blocks", "parse_moe_layers", "resize_position_grid",
    "vit_config",
    "LstmMoeConfig", "LstmMoeLM", "build_lstm_lm", "lstm_config",
]
