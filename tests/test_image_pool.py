import torch

from pipeline.gan.image_pool import ImagePool


def images(n, start=0):
    return torch.arange(start, start + n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, 2, 2).contiguous()


def test_fills_then_returns_new_images():
    pool = ImagePool(3, seed=0)
    out = pool.query(images(2))
    assert torch.equal(out, images(2)) and len(pool.images) == 2
    out = pool.query(images(1, 2))
    assert torch.equal(out, images(1, 2)) and len(pool.images) == 3


def test_swap_probability_is_one_half_once_full():
    pool = ImagePool(4, seed=123)
    pool.query(images(4, 1000))
    swaps = 0
    n = 2000
    for i in range(n):
        new = images(1, i)
        out = pool.query(new)
        swaps += int(not torch.equal(out, new))
    assert 0.45 < swaps / n < 0.55
    # A swapped-in image is stored: the pool now holds recent images.
    assert all(img[0, 0, 0, 0] >= n - 200 for img in pool.images)


def test_seeded_and_independent():
    def run(seed):
        pool = ImagePool(2, seed=seed)
        return torch.cat([pool.query(images(1, i)) for i in range(40)])

    assert torch.equal(run(7), run(7))
    assert not torch.equal(run(7), run(8))


def test_disabled_pool_passes_through():
    pool = ImagePool(0, seed=0)
    x = images(3)
    assert pool.query(x) is x


def test_stores_float32_under_low_precision():
    pool = ImagePool(2, seed=0)
    out = pool.query(images(1).bfloat16())
    assert out.dtype == torch.float32 and pool.images[0].dtype == torch.float32


def test_state_round_trip_continues_identically():
    a = ImagePool(3, seed=5)
    for i in range(6):
        a.query(images(1, i))
    b = ImagePool(3, seed=99)
    b.load_state_dict(a.state_dict())
    for i in range(6, 30):
        assert torch.equal(a.query(images(1, i)), b.query(images(1, i)))


def test_undo_last_query():
    pool = ImagePool(2, seed=1)
    pool.query(images(2))
    before = pool.state_dict()
    pool.query(images(2, 10))
    pool.undo_last_query()
    after = pool.state_dict()
    assert torch.equal(before["images"], after["images"]) and torch.equal(before["generator"], after["generator"])
