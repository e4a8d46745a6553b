"""Reference augmentation / evaluation resize against step-by-step transcriptions."""
import cv2
import numpy as np
import pytest
import torch

from fss_jax.data import transforms as T

MEAN = [0.485 * 255, 0.456 * 255, 0.406 * 255]
STD = [0.229 * 255, 0.224 * 255, 0.225 * 255]


def _scene(h, w, seed=0):
  """Random image and a {0, 1, 255} label with one rectangle of class pixels."""
  rng = np.random.default_rng(seed)
  image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
  label = np.zeros((h, w), np.uint8)
  y0, x0 = rng.integers(0, h // 2), rng.integers(0, w // 2)
  label[y0:y0 + h // 3, x0:x0 + w // 4] = 1
  label[:, :2] = 255
  return image, label


def _torch_normalize(image):
  """The reference's ToTensor + Normalize (sub_ then div_ per channel) in torch."""
  t = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float()
  for c, m, s in zip(t, MEAN, STD):
    c.sub_(m).div_(s)
  return t.numpy().transpose(1, 2, 0)


def _reference_train(image, label, rng, size):
  """Direct transcription of the reference steps, same rng draw order as documented."""
  image = np.float32(image)
  f = 0.9 + 0.2 * rng.random()
  image = cv2.resize(image, None, fx=f, fy=f, interpolation=cv2.INTER_LINEAR)
  label = cv2.resize(label, None, fx=f, fy=f, interpolation=cv2.INTER_NEAREST)
  if rng.random() < 0.5:
    angle = -10 + 20 * rng.random()
    h, w = label.shape
    m = cv2.getRotationMatrix2D((w / 2, h / 2), angle, 1)
    image = cv2.warpAffine(image, m, (w, h), flags=cv2.INTER_LINEAR,
                           borderMode=cv2.BORDER_CONSTANT, borderValue=MEAN)
    label = cv2.warpAffine(label, m, (w, h), flags=cv2.INTER_NEAREST,
                           borderMode=cv2.BORDER_CONSTANT, borderValue=255)
  if rng.random() < 0.5:
    image = cv2.GaussianBlur(image, (5, 5), 0)
  if rng.random() < 0.5:
    image, label = cv2.flip(image, 1), cv2.flip(label, 1)
  h, w = label.shape
  ph, pw = max(size - h, 0), max(size - w, 0)
  if ph or pw:
    image = cv2.copyMakeBorder(image, ph // 2, ph - ph // 2, pw // 2, pw - pw // 2,
                               cv2.BORDER_CONSTANT, value=MEAN)
    label = cv2.copyMakeBorder(label, ph // 2, ph - ph // 2, pw // 2, pw - pw // 2,
                               cv2.BORDER_CONSTANT, value=255)
  h, w = label.shape
  raw_pos = np.sum(label == 1)

  def crop():
    y, x = rng.integers(0, h - size + 1), rng.integers(0, w - size + 1)
    return image[y:y + size, x:x + size], label[y:y + size, x:x + size]

  img_c, lab_c = crop()
  tries = 0
  while np.sum(lab_c == 1) < 0.85 * raw_pos and tries < 30:
    img_c, lab_c = crop()
    tries += 1
  return _torch_normalize(img_c), lab_c


@pytest.mark.parametrize("shape,size", [((90, 70), 97), ((130, 150), 97),
                                        ((60, 200), 65)])
def test_train_transform_matches_reference_transcription(shape, size):
  image, label = _scene(*shape)
  cfg = T.TrainAugConfig(size=size)
  branches = set()
  for seed in range(12):
    out_img, out_lab = T.train_transform(image, label, np.random.default_rng(seed), cfg)
    ref_img, ref_lab = _reference_train(image, label, np.random.default_rng(seed), size)
    assert out_img.shape == (size, size, 3) and out_img.dtype == np.float32
    assert out_lab.shape == (size, size) and out_lab.dtype == np.uint8
    np.testing.assert_array_equal(out_lab, ref_lab)
    # The same cv2 calls and float32 normalisation: equal bit for bit here (measured 0); 1e-6
    # (4 float32 ulps at the normalised values' |v| <= 2.7) allows another CPU's vectorisation.
    np.testing.assert_allclose(out_img, ref_img, rtol=0, atol=1e-6)
    assert set(np.unique(out_lab)) <= {0, 1, 255}
    r = np.random.default_rng(seed)
    r.random()
    branches.add(r.random() < 0.5)
  assert branches == {True, False}  # both the rotate and no-rotate paths ran


def test_random_crop_pads_with_mean_and_ignore():
  image = np.full((20, 30, 3), 7.0, np.float32)
  label = np.ones((20, 30), np.uint8)
  img, lab = T.random_crop(image, label, np.random.default_rng(0), 41)
  # A 20x30 image in a 41x41 crop: everything visible, the rest is padding.
  assert (lab == 1).sum() == 600 and (lab == 255).sum() == 41 * 41 - 600
  np.testing.assert_array_equal(img[lab == 255], np.broadcast_to(
      np.float32(MEAN), ((lab == 255).sum(), 3)))
  np.testing.assert_array_equal(img[lab == 1], 7.0)
  # Centred padding: rows 10..29 (pad 21 -> 10 above), columns 5..34 (pad 11 -> 5 left).
  ys, xs = np.nonzero(lab == 1)
  assert (ys.min(), ys.max(), xs.min(), xs.max()) == (10, 29, 5, 34)


def test_random_crop_keeps_class_pixels_when_possible():
  label = np.zeros((200, 200), np.uint8)
  label[60:80, 90:115] = 1
  image = np.zeros((200, 200, 3), np.float32)
  # About 40% of windows hold the whole object: 31 draws all missing is ~1e-7.
  for seed in range(25):
    _, lab = T.random_crop(image, label, np.random.default_rng(seed), 97)
    assert (lab == 1).sum() >= 0.85 * 500


def test_random_crop_without_class_pixels_draws_once():
  label = np.zeros((120, 120), np.uint8)
  rng = np.random.default_rng(3)
  T.random_crop(np.zeros((120, 120, 3), np.float32), label, rng, 97)
  ref = np.random.default_rng(3)
  ref.integers(0, 24), ref.integers(0, 24)
  assert rng.random() == ref.random()


def test_eval_hw_hand_computed():
  # 473: longer side 473 -> 472; 375 * 473 / 500 = 354.75 -> 354 -> 352.
  assert T.eval_hw(375, 500, 473) == (352, 472)
  assert T.eval_hw(500, 375, 473) == (472, 352)
  assert T.eval_hw(100, 60, 97) == (96, 56)  # 58.2 -> 58 -> 56
  assert T.eval_hw(50, 50, 97) == (96, 96)   # upscales too


@pytest.mark.parametrize("shape", [(90, 70), (70, 90), (200, 130)])
def test_eval_resize_matches_reference(shape):
  image, label = _scene(*shape, seed=5)
  size = 97
  img, lab = T.eval_resize(image, label, size)
  h, w = shape
  if h >= w:
    nh, nw = size, int(w * (size / h))
  else:
    nh, nw = int(h * (size / w)), size
  nh, nw = nh // 8 * 8, nw // 8 * 8
  canvas = np.zeros((size, size, 3), np.float32)
  canvas[:nh, :nw] = cv2.resize(np.float32(image), (nw, nh), interpolation=cv2.INTER_LINEAR)
  ref_lab = np.full((size, size), 255, np.uint8)
  ref_lab[:nh, :nw] = cv2.resize(label, (nw, nh), interpolation=cv2.INTER_NEAREST)
  # As in the train test: bit-equal here; 1e-6 is 4 float32 ulps of the normalised values.
  np.testing.assert_allclose(img, _torch_normalize(canvas), rtol=0, atol=1e-6)
  np.testing.assert_array_equal(lab, ref_lab)
  assert set(np.unique(lab)) <= {0, 1, 255}


def test_binarize_and_pad_label():
  label = np.array([[0, 3, 5], [255, 3, 1]], np.uint8)
  np.testing.assert_array_equal(T.binarize_label(label, 3),
                                [[0, 1, 0], [255, 1, 0]])
  padded = T.pad_label(label)
  assert padded.shape == (3, 3) and (padded[2] == 255).all()
  assert T.pad_label(label, 5).shape == (5, 5)
  with pytest.raises(ValueError):
    T.pad_label(label, 2)


def test_check_size():
  assert T.check_size(473) == 473
  with pytest.raises(ValueError, match="8k\\+1"):
    T.check_size(472)


def test_out_buffers_match_returned_arrays():
  image, label = _scene(120, 90, seed=2)
  cfg = T.TrainAugConfig(size=65)
  img, lab = T.train_transform(image, label, np.random.default_rng(4), cfg)
  batch_img = np.full((2, 65, 65, 3), np.nan, np.float32)
  batch_lab = np.full((2, 65, 65), -1, np.int32)
  T.train_transform(image, label, np.random.default_rng(4), cfg,
                    out=(batch_img[1], batch_lab[1]))
  np.testing.assert_array_equal(batch_img[1], img)
  np.testing.assert_array_equal(batch_lab[1], lab)
  T.eval_resize(image, label, 65, out=(batch_img[0], batch_lab[0]))
  want_img, want_lab = T.eval_resize(image, label, 65)
  np.testing.assert_array_equal(batch_img[0], want_img)
  np.testing.assert_array_equal(batch_lab[0], want_lab)
  with pytest.raises(ValueError, match="buffers"):
    T.eval_resize(image, label, 97, out=(batch_img[0], batch_lab[0]))


def test_normalize_equals_torch_bitwise_and_fills_windows():
  rng = np.random.default_rng(0)
  image = (rng.random((37, 41, 3)) * 255).astype(np.float32)
  image[0, :3] = [0, 127.5, 255]
  want = _torch_normalize(image)
  np.testing.assert_array_equal(T.normalize(image), want)
  np.testing.assert_array_equal(T.normalize(image.astype(np.uint8)),
                                _torch_normalize(image.astype(np.uint8).astype(np.float32)))
  canvas = np.full((2, 50, 60, 3), np.nan, np.float32)  # a window of a batch, as in pipeline
  T.normalize(image, out=canvas[1, 5:42, 7:48])
  np.testing.assert_array_equal(canvas[1, 5:42, 7:48], want)
  assert np.isnan(canvas[0]).all() and np.isnan(canvas[1, :5]).all()
  batch = np.stack([image, image[::-1]])                # leading axes: image by image
  np.testing.assert_array_equal(T.normalize(batch)[1], _torch_normalize(image[::-1]))
  with pytest.raises(ValueError, match="same shape"):
    T.normalize(image, out=np.empty((37, 40, 3), np.float32))
