"""Models: a timm backbone + one linear classifier (bigltr.models.classifier)."""
from bigltr.models import cifar_resnet  # noqa: F401  (registers resnet32_cifar / resnet34_cifar with timm)
from bigltr.models.classifier import LTModel, build_checkpoint_model, build_model, check_etf_fits, feature_dim

__all__ = ["LTModel", "build_checkpoint_model", "build_model", "check_etf_fits", "feature_dim"]
