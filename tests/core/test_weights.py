"""ImageNet weights as torchvision users expect: a local file, torch's cache, or a hash-checked download.

Downloads are served from a local HTTP server on 127.0.0.1; no test touches the internet."""
import functools
import hashlib
import http.server
import socket
import threading

import pytest
import torch

from urbanlens.core import backbones, errors


class _Server:
    """A throw-away HTTP server for one folder, counting the requests it answers."""

    def __init__(self, folder):
        self.requests = []
        outer = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_GET(self):
                outer.requests.append(self.path)
                super().do_GET()

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                                     functools.partial(Handler, directory=str(folder)))
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_port}/{name}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def served(tmp_path, monkeypatch):
    """A small state dict published under a torchvision-style name ``<arch>-<sha256 prefix>.pth``."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.delenv("URBANLENS_OFFLINE", raising=False)
    www = tmp_path / "www"
    www.mkdir()
    state = {"weight": torch.arange(12, dtype=torch.float32).reshape(3, 4), "bias": torch.ones(3)}
    torch.save(state, www / "tmp.pth")
    digest = hashlib.sha256((www / "tmp.pth").read_bytes()).hexdigest()
    good = f"tiny-{digest[:8]}.pth"
    (www / "tmp.pth").rename(www / good)
    bad = f"tiny-{'0' * 8 if digest[:8] != '0' * 8 else '1' * 8}.pth"  # a name whose hash does not match
    (www / bad).write_bytes((www / good).read_bytes())
    server = _Server(www)
    yield server, state, good, bad, tmp_path / "hub" / "checkpoints"
    server.close()


def test_download_goes_to_the_hub_cache_and_is_reused(served):
    server, state, good, _, cache = served
    got = backbones.imagenet_state_dict("resnet18", url=server.url(good))
    assert set(got) == set(state) and all(torch.equal(got[k], state[k]) for k in state)
    assert (cache / good).is_file() and len(server.requests) == 1
    again = backbones.imagenet_state_dict("resnet18", url=server.url(good))
    assert torch.equal(again["weight"], state["weight"]) and len(server.requests) == 1  # from the cache


def test_a_corrupted_download_is_refused_and_not_cached(served):
    server, _, _, bad, cache = served
    with pytest.raises(errors.WeightsUnavailable, match="does not match its hash"):
        backbones.imagenet_state_dict("resnet18", url=server.url(bad))
    assert not cache.exists() or not any(cache.iterdir())


def test_offline_gives_the_way_out(served, monkeypatch):
    _, _, good, _, cache = served
    with socket.socket() as s:  # a port on this machine that nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    with pytest.raises(errors.WeightsUnavailable) as e:
        backbones.imagenet_state_dict("resnet18", url=f"http://127.0.0.1:{closed}/{good}", timeout_s=5)
    msg = str(e.value)
    assert "download" in msg and "cities.model.weights_path" in msg and "cities.model.pretrained=false" in msg
    assert "\n" not in msg and not (cache / good).exists()
    monkeypatch.setenv("URBANLENS_OFFLINE", "1")  # never even tries
    with pytest.raises(errors.WeightsUnavailable, match="URBANLENS_OFFLINE"):
        backbones.imagenet_state_dict("resnet18", url=served[0].url(good))
    assert served[0].requests == []


def test_weights_path_wins_and_a_missing_one_is_named(served, tmp_path):
    server, state, good, _, _ = served
    local = tmp_path / "mine.pth"
    torch.save({"weight": torch.zeros(3, 4)}, local)
    got = backbones.imagenet_state_dict("resnet18", weights_path=str(local), url=server.url(good))
    assert torch.equal(got["weight"], torch.zeros(3, 4)) and server.requests == []
    with pytest.raises(errors.WeightsUnavailable, match="nowhere.pth"):
        backbones.imagenet_state_dict("resnet18", weights_path=str(tmp_path / "nowhere.pth"))


def test_build_backbone_downloads_real_shaped_weights(served, monkeypatch, tmp_path):
    server = served[0]
    net = backbones.build_backbone("resnet18", 1000)
    name = "resnet18-00000000.pth"  # rewritten below to its true hash prefix
    torch.save(net.state_dict(), tmp_path / "www" / name)
    digest = hashlib.sha256((tmp_path / "www" / name).read_bytes()).hexdigest()[:8]
    (tmp_path / "www" / name).rename(tmp_path / "www" / f"resnet18-{digest}.pth")
    monkeypatch.setattr(backbones, "weights_url", lambda arch: server.url(f"{arch}-{digest}.pth"))
    model = backbones.build_backbone("resnet18", 4, pretrained=True)
    assert torch.equal(model.conv1.weight, net.conv1.weight) and model.fc.out_features == 4


def _publish(state: dict, folder, stem: str) -> str:
    """``state`` saved under ``folder`` as ``<stem>-<sha256 prefix>.pth`` (the name torch's hub checks); its name."""
    tmp = folder / f"{stem}.tmp"
    torch.save(state, tmp)
    name = f"{stem}-{hashlib.sha256(tmp.read_bytes()).hexdigest()[:8]}.pth"
    tmp.rename(folder / name)
    return name


def test_torchgeo_weights_download_through_torchs_hub_into_its_cache(served, tmp_path):
    from urbanlens.core import weights_source

    server = served[0]
    source = weights_source.parse("torchgeo:ResNet18_Weights.SENTINEL2_RGB_MOCO")
    published = backbones.torchgeo_model(source).state_dict()
    published.pop("fc.weight"), published.pop("fc.bias")  # as torchgeo ships them: no classifier
    name = _publish(published, tmp_path / "www", "resnet18_sentinel2_rgb_moco")
    model = backbones.torchgeo_model(source, pretrained=True, url=server.url(name))
    assert torch.equal(model.conv1.weight, published["conv1.weight"]) and len(server.requests) == 1
    assert (served[4] / name).is_file()  # torch's hub cache, as torchgeo itself would leave it
    backbones.torchgeo_model(source, pretrained=True, url=server.url(name))
    assert len(server.requests) == 1  # the second time from the cache
    wrong = name.replace(name[-12:-4], "0" * 8 if name[-12:-4] != "0" * 8 else "1" * 8)
    (tmp_path / "www" / wrong).write_bytes((tmp_path / "www" / name).read_bytes())
    with pytest.raises(errors.WeightsUnavailable, match="does not match its hash"):
        backbones.torchgeo_model(source, pretrained=True, url=server.url(wrong))


def test_timm_weights_through_timms_loader_from_a_mirror_and_offline(served, tmp_path, monkeypatch):
    import huggingface_hub.constants as hub

    server = served[0]
    published = backbones.timm_model("test_convnext").state_dict()
    name = _publish(published, tmp_path / "www", "test_convnext")
    model = backbones.timm_model("test_convnext", pretrained=True, url=server.url(name))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in published.items()) and len(server.requests) == 1
    model = backbones.build_backbone("timm:test_convnext", 3)
    assert backbones.head(model).out_features == 3

    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hf"))  # an empty Hugging Face cache
    monkeypatch.setenv("URBANLENS_OFFLINE", "1")
    with pytest.raises(errors.WeightsUnavailable) as e:
        backbones.timm_model("test_convnext", pretrained=True, section="ses.model")
    msg = str(e.value)
    assert "URBANLENS_OFFLINE" in msg and "ses.model.weights_path" in msg and "ses.model.pretrained=false" in msg
    assert "\n" not in msg and hub.HF_HUB_OFFLINE is False  # the hub's own switch is left as it was
    local = tmp_path / "mine.pth"
    torch.save(published, local)
    model = backbones.timm_model("test_convnext", pretrained=True, weights_path=str(local))  # the way out
    assert torch.equal(model.stem[0].weight, published["stem.0.weight"])
