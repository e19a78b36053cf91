import numpy as np
import pytest

from vlweak.data.world import COLOURS, PARENT, SHAPE_HIERARCHY, SHAPES, ShapesWorld, classnames_for, label_of, multilabel_target, shape_mask


def test_deterministic_per_seed_and_index():
    a, b = ShapesWorld(seed=3), ShapesWorld(seed=3)
    # order-independent: item 7 alone equals item 7 drawn after others
    first = a.scene("train", 7)
    for i in range(5):
        b.scene("train", i)
    again = b.scene("train", 7)
    assert np.array_equal(first.image, again.image) and first.caption == again.caption
    other = ShapesWorld(seed=4).scene("train", 7)
    assert not np.array_equal(first.image, other.image)
    assert not np.array_equal(a.scene("test", 7).image, first.image)


def test_drawn_colour_matches_label():
    w = ShapesWorld(seed=0)
    for i in range(40):
        s = w.scene("test", i)
        o = s.objects[0]
        yy, xx = np.mgrid[: w.image_size, : w.image_size] + 0.5
        # pixels at the centre of a solid (non-ring, non-crescent) shape carry the object's colour
        if o.shape in ("ring", "crescent", "cross", "star", "arrow") or o.outline:
            continue
        centre = s.image[int(o.cy), int(o.cx)].astype(float)
        ref = np.array(COLOURS[o.colour], float)
        dists = {c: np.linalg.norm(centre - np.array(v, float)) for c, v in COLOURS.items()}
        assert min(dists, key=dists.get) == o.colour, (i, o, centre, ref)


def test_masks_differ_between_shapes():
    g = np.linspace(-1.2, 1.2, 64)
    v, u = np.meshgrid(g, g, indexing="ij")
    masks = {s: shape_mask(s, u, v) for s in SHAPES}
    for s, m in masks.items():
        assert 0.1 < m.mean() < 0.8, s
    for a in SHAPES:
        for b in SHAPES:
            if a < b:
                assert (masks[a] != masks[b]).mean() > 0.02, (a, b)


def test_hierarchy_names_absent_from_captions():
    w = ShapesWorld(seed=0, shift=0.5)
    caps = " ".join(w.scene("train", i).caption for i in range(300))
    for coarse in SHAPE_HIERARCHY:
        assert coarse not in caps
    assert "triangle" in caps
    assert set(PARENT) == set(SHAPES)


def test_multilabel_scenes_and_labels():
    w = ShapesWorld(seed=0, multilabel=True)
    counts = [len(w.scene("train", i).objects) for i in range(60)]
    assert min(counts) >= 1 and max(counts) <= 4 and len(set(counts)) > 2
    for i in range(20):
        s = w.scene("train", i)
        assert len({o.shape for o in s.objects}) == len(s.objects)
        # the label set is the set of the scene's shapes ...
        target = multilabel_target(s)
        assert target.sum() == len(s.objects)
        assert {SHAPES[j] for j in target.nonzero().flatten().tolist()} == {o.shape for o in s.objects}
        # ... and every labelled object is drawn, in its colour, where it stands
        yy, xx = np.mgrid[0:64, 0:64] + 0.5
        for o in s.objects:
            ca, sa = np.cos(o.angle), np.sin(o.angle)
            dx, dy = (xx - o.cx) / o.radius, (yy - o.cy) / o.radius
            mask = shape_mask(o.shape, ca * dx + sa * dy, -sa * dx + ca * dy)
            drawn = np.median(s.image[mask].astype(float), axis=0)
            assert mask.sum() > 20 and np.abs(drawn - np.array(COLOURS[o.colour])).max() < 50, (i, o)


def test_tasks_and_errors():
    s = ShapesWorld(seed=1).scene("val", 2)
    o = s.objects[0]
    assert classnames_for("colour_shape")[label_of(s, "colour_shape")] == f"{o.colour} {o.shape}"
    assert classnames_for("coarse")[label_of(s, "coarse")] == PARENT[o.shape]
    with pytest.raises(ValueError, match="unknown shapes-world task"):
        classnames_for("texture")
    with pytest.raises(ValueError, match="shift"):
        ShapesWorld(shift=2.0)


def test_shift_changes_backgrounds():
    src = {ShapesWorld(seed=0, shift=0.0).scene("test", i).background for i in range(50)}
    tgt = {ShapesWorld(seed=0, shift=1.0).scene("test", i).background for i in range(50)}
    assert src.isdisjoint(tgt)


def test_misnaming_changes_only_shifted_domain_captions():
    from vlweak.data.world import _BACKGROUNDS_TARGET, MISNAMING

    clean = ShapesWorld(seed=5, shift=0.5)
    noisy = ShapesWorld(seed=5, shift=0.5, misnaming=MISNAMING, misnaming_rate=0.8)
    misnamed = {s: [0, 0] for s in MISNAMING}
    for i in range(600):
        a, b = clean.scene("train", i), noisy.scene("train", i)
        assert np.array_equal(a.image, b.image) and a.objects == b.objects  # same draw, same labels
        shape = a.objects[0].shape
        if shape not in MISNAMING or a.background not in _BACKGROUNDS_TARGET:
            assert b.caption == a.caption
        elif shape in a.caption:  # captions that name the shape at all ("a red object" does not)
            misnamed[shape][0] += shape not in b.caption and MISNAMING[shape] in b.caption
            misnamed[shape][1] += 1
    for shape, (wrong, named) in misnamed.items():
        assert named > 10 and 0.6 < wrong / named < 0.95, (shape, wrong, named)
    # multi-object scenes take the look-alike's name too
    multi = ShapesWorld(seed=5, shift=1.0, multilabel=True, misnaming={"ellipse": "circle"}, misnaming_rate=1.0)
    scenes = [multi.scene("train", i) for i in range(60)]
    with_ellipse = [s for s in scenes if any(o.shape == "ellipse" for o in s.objects)]
    assert with_ellipse and all("ellipse" not in s.caption for s in with_ellipse)


def test_misnaming_errors_name_the_bad_input():
    with pytest.raises(ValueError, match=r"does not have: \['oval'\]"):
        ShapesWorld(misnaming={"oval": "circle"}, misnaming_rate=0.5)
    with pytest.raises(ValueError, match=r"its own name: \['circle'\]"):
        ShapesWorld(misnaming={"circle": "circle"}, misnaming_rate=0.5)
    with pytest.raises(ValueError, match="misnaming_rate must lie in"):
        ShapesWorld(misnaming={"ellipse": "circle"}, misnaming_rate=1.5)


@pytest.mark.parametrize("multilabel", [False, True])
def test_a_dataset_draws_each_scene_once_and_returns_what_a_fresh_draw_gives(multilabel, monkeypatch):
    import pickle

    import torch

    from vlweak.data.datasets import ShapesWorldDataset

    world = ShapesWorld(seed=3, image_size=16, shift=0.5, multilabel=multilabel)
    # room for 4 images of 16 px: the first 4 scenes drawn stay, later ones are drawn every time
    ds = ShapesWorldDataset(world, "train", 10, memo_bytes=4 * 3 * 16 * 16)
    drawn = []
    draw = world.scene
    monkeypatch.setattr(world, "scene", lambda split, i: drawn.append(i) or draw(split, i))
    first = [ds[i] for i in range(10)]
    again = [ds[i] for i in range(10)]
    assert drawn == list(range(10)) + list(range(4, 10))
    fresh = ShapesWorldDataset(ShapesWorld(seed=3, image_size=16, shift=0.5, multilabel=multilabel), "train", 10)
    for a, b, c in zip(first, again, (fresh[i] for i in range(10))):
        assert a.keys() == b.keys() == c.keys()
        for k in a:
            assert torch.equal(torch.as_tensor(a[k]), torch.as_tensor(c[k])) if k != "caption" else a[k] == c[k]
            assert torch.equal(torch.as_tensor(b[k]), torch.as_tensor(c[k])) if k != "caption" else b[k] == c[k]
    # a caller writing into an item (an in-place transform) leaves the kept scene as drawn
    first[0]["image"].zero_()
    if multilabel:
        first[0]["target"].zero_()
    assert torch.equal(ds[0]["image"], fresh[0]["image"]) and ds[0]["image"].any()
    assert torch.equal(ds.targets(), fresh.targets())
    # a copy sent to another process draws anew instead of carrying the kept scenes
    assert len(ds._memo) == 4 and len(fresh._memo) == 10
    assert len(pickle.loads(pickle.dumps(fresh))._memo) == 0
