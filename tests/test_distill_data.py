import torch

from distill.data import LatentShards, Loader, write_latent_shards
from distill.synthetic import COLOURS, LABELS, SyntheticVideos
from streamgen.text import WordHashEncoder
from streamgen.vae import WanVAE
from streamgen.vae import preset as vae_preset


def test_synthetic_clips_are_deterministic_and_match_their_captions():
    a, b = SyntheticVideos(40, seed=7, frames=9, height=32, width=32), SyntheticVideos(40, seed=7, frames=9,
                                                                                      height=32, width=32)
    assert torch.equal(a[3].video, b[3].video) and a[3].caption == b[3].caption
    assert not torch.equal(a[3].video, SyntheticVideos(40, seed=8, frames=9, height=32, width=32)[3].video)
    seen = set()
    for i in range(len(a)):
        clip, scene = a[i], a.scene(i)
        assert clip.video.shape == (3, 9, 32, 32) and -1 <= clip.video.min() and clip.video.max() <= 1
        names = {name: LABELS[name][clip.labels[name]] for name in LABELS}
        assert clip.caption == f"a {names['colour']} {names['shape']} {names['motion']} on a {scene.background} " \
                               "background"
        seen.add(names["motion"])
        pixels = ((clip.video + 1) * 127.5).round()
        colour = torch.tensor(COLOURS[names["colour"]], dtype=torch.float32).view(3, 1, 1, 1)
        mask = (pixels - colour).abs().sum(0) < 1  # (F, H, W): where the shape is
        assert mask.flatten(1).any(1).all(), "the shape is visible in every frame"
        if names["motion"].startswith("moving"):
            summed = 0 if names["motion"] in ("moving left", "moving right") else 1  # profile along x, or along y
            coords = torch.arange(32.0)
            centre = [(mask[f].float().sum(summed) * coords).sum() / mask[f].sum() for f in (0, 8)]
            sign = 1 if names["motion"] in ("moving right", "moving down") else -1
            assert sign * (centre[1] - centre[0]) > 4, "it moves the way the caption says"
    assert len(seen) >= 4


class Indices:
    """11 samples whose batches are their indices."""

    def __len__(self):
        return 11

    def batch(self, indices):
        return indices


def test_shards_round_trip_and_loader_shards_and_resumes(tmp_path):
    torch.manual_seed(0)
    videos = SyntheticVideos(11, seed=2, frames=5, height=32, width=32)
    vae = WanVAE(vae_preset("tiny")).eval()
    encoder = WordHashEncoder(32, 16)
    write_latent_shards(tmp_path / "d", videos, vae, encoder, shard_size=4, batch_size=2)
    shards = LatentShards(tmp_path / "d")
    assert len(shards) == 11 and len(shards.index["shards"]) == 3
    batch = shards.batch([9, 1])
    assert torch.allclose(batch["latents"][0], vae.encode(videos[9].video[None])[0], atol=1e-5)
    assert torch.equal(batch["prompt_embeds"][1], encoder.encode([videos[1].caption])[0])
    assert shards.metadata(9) == (videos[9].caption, [videos[9].labels[n] for n in LABELS])
    assert torch.equal(shards.negative, encoder.encode([""]))

    ranks = [Loader(Indices(), 2, rank, 2, seed=4) for rank in range(2)]
    draws = [[r.next() for _ in range(5)] for r in ranks]  # 2 full global batches of 4 per epoch
    for step in range(5):
        assert not set(draws[0][step]) & set(draws[1][step])  # ranks split each global batch
    assert set(draws[0][0] + draws[1][0] + draws[0][1] + draws[1][1]) <= set(range(11))
    assert len(set(draws[0][0] + draws[1][0] + draws[0][1] + draws[1][1])) == 8  # no repeats within an epoch
    assert draws[0][2] != draws[0][0] or draws[0][3] != draws[0][1]  # a new order next epoch

    fresh = Loader(Indices(), 2, 0, 2, seed=4)
    replay = [fresh.next() for _ in range(3)]
    state = fresh.state_dict()
    resumed = Loader(Indices(), 2, 0, 2, seed=4)
    resumed.load_state_dict(state)
    assert replay + [resumed.next(), resumed.next()] == draws[0]
