"""Entrypoints of the flowhub example hub: small OneFlow models with pretrained weights."""
import json
import os

dependencies = ["oneflow"]

from tinymodels.nets import VERSION as _VERSION  # noqa: E402
from tinymodels.nets import TinyMLP as _TinyMLP  # noqa: E402
from tinymodels.nets import TinyNet as _TinyNet  # noqa: E402

_REPO = "flowhub-examples/tiny-models"


def _load_pretrained(model, name):
    """Fetch this version's release asset for ``name`` through the hub API and load it."""
    import oneflow.hub

    with open(os.path.join(os.path.dirname(__file__), "weights.json")) as f:
        manifest = json.load(f)
    base = os.environ.get("FLOWHUB_GITHUB_URL", "https://github.com").rstrip("/")
    url = f"{base}/{_REPO}/releases/download/{manifest['tag']}/{manifest['files'][name]}"
    model.load_state_dict(oneflow.hub.load_state_dict_from_url(url, check_hash=True))
    return model


def tinynet(pretrained=False, num_classes=10):
    """TinyNet: a small CNN classifier for 3x32x32 images.

    pretrained (bool): load this release's weights (only with num_classes=10)
    num_classes (int): size of the output layer
    Example: model = hub.load("flowhub-examples/tiny-models:v0.1", "tinynet", pretrained=True)
    """
    model = _TinyNet(num_classes=num_classes)
    return _load_pretrained(model, "tinynet") if pretrained else model


def tinymlp(pretrained=False, hidden=32):
    """TinyMLP: a two-layer perceptron on 64 features.

    pretrained (bool): load this release's weights (only with hidden=32)
    """
    model = _TinyMLP(hidden=hidden)
    return _load_pretrained(model, "tinymlp") if pretrained else model


def version():
    """The version of the model code in this checkout."""
    return _VERSION
