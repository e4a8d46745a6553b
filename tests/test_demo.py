"""The web demo (fss_jax/infer/demo.py, scripts/demo.py).

One app is launched on 127.0.0.1 for the module, around a tiny ASGNet with random weights (read
back from a .msgpack file, as ``scripts/demo.py --checkpoint`` does). Its Run endpoint is called
through gradio's Python client and checked against ``Predictor.predict`` on the same inputs;
the input errors are checked as the client and the page report them; one test drives the page in
a real browser (Debian's Chromium through its chromedriver, skipped without them). No test
reaches beyond this machine: the module fails if anything tries to.
"""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import traceback
import urllib.request

import cv2
import numpy as np
import pytest

# gradio_client asks the Hugging Face Hub for an "agent registry" and sends telemetry unless
# these are set before huggingface_hub is imported (fss_jax/infer/demo.py sets them too).
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
gr = pytest.importorskip(
    "gradio", reason="the demo needs gradio: pip install -r requirements-demo.txt")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client import exceptions as client_exceptions  # noqa: E402

from fss_jax.infer import demo  # noqa: E402
from fss_jax.infer import explain  # noqa: E402
from fss_jax.infer import predictor as predictor_lib  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
LOOPBACK = ("127.0.0.1", "::1", "localhost")


# ----------------------------------------------------------------------------- set-up


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _random_variables(model, config, seed=0):
  """Random variables of the model's shapes, made in numpy (no init program to compile): He
  normal kernels, small biases, unit BN scales and statistics."""
  import jax  # pylint: disable=g-import-not-at-top
  from fss_jax.models import registry  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name, shape = jax.tree_util.keystr(path), tuple(leaf.shape)
    if "batch_stats" in name:
      return np.full(shape, 1.0 if "var" in name else 0.0, np.float32)
    if len(shape) >= 2:
      return (rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[:-1]))).astype(np.float32)
    if "scale" in name:
      return np.ones(shape, np.float32)
    return (0.1 * rng.standard_normal(shape)).astype(np.float32)

  template = registry.variables_template(model, config.data.image_size, 1)
  return jax.tree_util.tree_map_with_path(fill, template)


@pytest.fixture(scope="module")
def no_outside_network():
  """Fails the module's tests if anything in this process resolves or connects to a host
  other than the loopback (gradio's analytics, the Hub, a CDN ...)."""
  attempts = []
  real_connect, real_getaddrinfo = socket.socket.connect, socket.getaddrinfo

  def host_of(address):
    return address[0] if isinstance(address, tuple) else str(address)

  def connect(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6) and host_of(address) not in LOOPBACK:
      attempts.append(("connect", address, "".join(traceback.format_stack(limit=25))))
    return real_connect(self, address)

  def getaddrinfo(host, *args, **kwargs):
    if host not in LOOPBACK and host is not None:
      attempts.append(("getaddrinfo", host, "".join(traceback.format_stack(limit=25))))
    return real_getaddrinfo(host, *args, **kwargs)

  socket.socket.connect, socket.getaddrinfo = connect, getaddrinfo
  yield attempts
  socket.socket.connect, socket.getaddrinfo = real_connect, real_getaddrinfo


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """Support images, a painted brush layer, mask files and queries (PNG) and their truth."""
  d = tmp_path_factory.mktemp("demo_files")
  rng = np.random.default_rng(0)

  def rgb_png(name, h, w):
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    predictor_lib.write_rgb_png(str(d / name), image)
    return str(d / name)

  out = {
      "support1": rgb_png("support1.png", 60, 80),
      "support2": rgb_png("support2.png", 70, 50),
      "query1": rgb_png("query1.png", 45, 90),   # wide
      "query2": rgb_png("query2.png", 80, 40),   # tall
  }
  # The brush layer of support 1 (RGBA at the image's size): an opaque stroke, a faint halo
  # (alpha < 128: not painted) and colour under zero alpha (not painted).
  layer = np.zeros((60, 80, 4), np.uint8)
  layer[..., :3] = (255, 32, 64)
  layer[15:40, 20:55, 3] = 255
  layer[14, 20:55, 3] = 60
  out["layer1_mask"] = (layer[..., 3] >= 128).astype(np.uint8)
  cv2.imwrite(str(d / "layer1.png"), cv2.cvtColor(layer, cv2.COLOR_RGBA2BGRA))
  out["layer1"] = str(d / "layer1.png")
  # Support 2's mask file: class ids 3 and 7 and an ignore band (255).
  labels = np.zeros((70, 50), np.uint8)
  labels[10:50, 5:30] = 3
  labels[40:65, 25:45] = 7
  labels[9, 5:30] = 255
  cv2.imwrite(str(d / "support2_labels.png"), labels)
  out["mask2"] = str(d / "support2_labels.png")
  # A binary mask for support 1 (0 / 255) and an all-zero one.
  binary = np.zeros((60, 80), np.uint8)
  binary[20:45, 10:40] = 255
  cv2.imwrite(str(d / "support1_mask.png"), binary)
  out["mask1"] = str(d / "support1_mask.png")
  cv2.imwrite(str(d / "empty_mask.png"), np.zeros((60, 80), np.uint8))
  out["empty_mask"] = str(d / "empty_mask.png")
  return out


@pytest.fixture(scope="module")
def predictor(tmp_path_factory):
  from fss_jax import configs_lib  # pylint: disable=g-import-not-at-top
  from fss_jax.convert import io  # pylint: disable=g-import-not-at-top
  from fss_jax.models import registry  # pylint: disable=g-import-not-at-top
  config = configs_lib.load_config(os.path.join(REPO, "configs", "tiny_asgnet.py"))
  path = str(tmp_path_factory.mktemp("demo_model") / "tiny_asgnet.msgpack")
  io.save_variables(path, _random_variables(registry.build_model(config), config))
  return predictor_lib.Predictor.from_checkpoint(path, config)


@pytest.fixture(scope="module")
def app(predictor, no_outside_network):
  page = demo.build_app(predictor)
  page.launch(server_name="127.0.0.1", server_port=_free_port(), prevent_thread_lock=True,
              quiet=True, share=False)
  yield page
  page.close()
  assert not no_outside_network, "tried to reach beyond the loopback:\n" + "\n".join(str(a[-1]) for a in no_outside_network)


@pytest.fixture(scope="module")
def client(app, tmp_path_factory):
  # In case huggingface_hub was imported before this module set the variables above.
  import huggingface_hub.constants  # pylint: disable=g-import-not-at-top
  huggingface_hub.constants.HF_HUB_OFFLINE = True
  huggingface_hub.constants.HF_HUB_DISABLE_TELEMETRY = True
  return Client(app.local_url, verbose=False, analytics_enabled=False,
                download_files=str(tmp_path_factory.mktemp("client_downloads")))


def _slots(editors=(), masks=()):
  """The Run endpoint's support inputs: MAX_SHOTS editors, then MAX_SHOTS mask files."""
  editors = list(editors) + [None] * (demo.MAX_SHOTS - len(editors))
  masks = list(masks) + [None] * (demo.MAX_SHOTS - len(masks))
  return editors + masks


def _editor(background, layers=()):
  return {"background": handle_file(background), "layers": [handle_file(p) for p in layers],
          "composite": None}


def _gallery_images(value):
  """(uint8 RGB, caption) of a Gallery output as the client returns it."""
  out = []
  for item in value:
    image = item["image"]
    path = image["path"] if isinstance(image, dict) else image
    out.append((predictor_lib.read_image(path), item.get("caption")))
  return out


# ----------------------------------------------------------------------------- client


def test_run_through_client_matches_predictor(client, predictor, files):
  """A 2-shot run with two queries: support 1 painted (brush layer), support 2 from a mask
  file of class ids (class id 3); the masks, overlays and panels equal the library's."""
  inputs = _slots([_editor(files["support1"], [files["layer1"]]), _editor(files["support2"])],
                  [None, handle_file(files["mask2"])])
  queries = [handle_file(files["query1"]), handle_file(files["query2"])]
  overlays, panels, downloads, message = client.predict(*inputs, "3", queries,
                                                        api_name="/" + demo.API_NAME)
  supports = [
      predictor_lib.Support(predictor_lib.read_image(files["support1"]), files["layer1_mask"]),
      predictor_lib.Support(predictor_lib.read_image(files["support2"]),
                            predictor_lib.read_mask(files["mask2"], 3))]
  assert set(np.unique(supports[1].mask)) == {0, 1, 255}
  query_images = [predictor_lib.read_image(files[q]) for q in ("query1", "query2")]
  expected = predictor.predict(supports, query_images, ["query1.png", "query2.png"])

  masks = [p for p in downloads if p.endswith("_mask.png")]
  figures = [p for p in downloads if p.endswith("_explain.png")]
  assert [os.path.basename(p) for p in masks] == ["query1_mask.png", "query2_mask.png"]
  assert [os.path.basename(p) for p in figures] == ["query1_explain.png", "query2_explain.png"]
  for path, pred in zip(masks, expected):
    got = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    assert got.shape == pred.query.shape[:2]
    np.testing.assert_array_equal(got, pred.mask * 255)
  for path, pred in zip(figures, expected):
    np.testing.assert_array_equal(
        predictor_lib.read_image(path),
        explain.figure(predictor.model_name, pred, **demo.explain_options(predictor)))

  shown = _gallery_images(overlays)
  assert len(shown) == 2
  for (image, caption), pred, name in zip(shown, expected, ("query1.png", "query2.png")):
    np.testing.assert_array_equal(image, predictor_lib.overlay(pred))
    assert caption == f"{name}: {100 * pred.mask.mean():.1f}% object"
  want_panels = [(f"{name}: {title}", picture) for pred, name in zip(expected, ("query1.png",
                                                                                "query2.png"))
                 for title, picture in explain.panels(predictor.model_name, pred,
                                                      **demo.explain_options(predictor))]
  got_panels = _gallery_images(panels)
  assert [c for _, c in got_panels] == [c for c, _ in want_panels]
  for (image, _), (_, want) in zip(got_panels, want_panels):
    np.testing.assert_array_equal(image, want)
  assert "2-shot" in message and "2 queries" in message


@pytest.mark.parametrize("case", ["no_support", "painting_empty", "mask_file_empty",
                                  "class_absent", "mask_without_image", "no_query",
                                  "mask_size", "bad_class_id"])
def test_input_errors_through_client(client, files, case):
  s1, m1, q = files["support1"], files["mask1"], [handle_file(files["query1"])]
  cases = {
      "no_support": (_slots(), "", q, demo.NO_SUPPORT),
      "painting_empty": (_slots([_editor(s1)]), "", q, demo.empty_mask_message(0)),
      "mask_file_empty": (_slots([_editor(s1)], [handle_file(files["empty_mask"])]), "", q,
                          demo.empty_mask_message(0, "empty_mask.png")),
      "class_absent": (_slots([None, _editor(s1)], [None, handle_file(m1)]), "9", q,
                       demo.empty_mask_message(1, "support1_mask.png", 9)),
      "mask_without_image": (_slots([], [handle_file(m1)]), "", q,
                             "Support 1: a mask file but no image"),
      "no_query": (_slots([_editor(s1)], [handle_file(m1)]), "", None, demo.NO_QUERY),
      "mask_size": (_slots([_editor(files["support2"])], [handle_file(m1)]), "", q,
                    "Support 1: the mask file support1_mask.png is 60x80 (HxW) but the image "
                    "is 70x50"),
      "bad_class_id": (_slots([_editor(s1)], [handle_file(m1)]), "x", q,
                       "The class id must be a whole number"),
  }
  inputs, class_id, queries, message = cases[case]
  with pytest.raises(client_exceptions.AppError) as err:
    client.predict(*inputs, class_id, queries, api_name="/" + demo.API_NAME)
  assert message in str(err.value)
  assert not re.search(r"/tmp/|gradio_api", str(err.value))  # file names, not cache paths


def test_run_called_directly(predictor, files, tmp_path):
  """``demo.run`` without a server: an editor value of numpy arrays (as gradio passes them,
  RGBA), a painted layer; the same as ``Predictor.predict``."""
  image = predictor_lib.read_image(files["support1"])
  rgba = np.concatenate([image, np.full(image.shape[:2] + (1,), 255, np.uint8)], axis=2)
  layer = cv2.cvtColor(cv2.imread(files["layer1"], cv2.IMREAD_UNCHANGED), cv2.COLOR_BGRA2RGBA)
  result = demo.run(predictor, [{"background": rgba, "layers": [layer], "composite": None}],
                    [None], [files["query2"]], out_dir=str(tmp_path))
  [want] = predictor.predict([predictor_lib.Support(image, files["layer1_mask"])],
                             [predictor_lib.read_image(files["query2"])])
  [got] = result.predictions
  np.testing.assert_array_equal(got.mask, want.mask)
  np.testing.assert_array_equal(got.fg_score, want.fg_score)
  assert sorted(os.listdir(tmp_path)) == ["query2_explain.png", "query2_mask.png"]
  assert "1-shot" in result.message
  with pytest.raises(demo.InputError, match="No query"):
    demo.run(predictor, [{"background": rgba, "layers": [layer]}], [None], [])


def test_synthetic_examples(predictor, tmp_path):
  examples = demo.synthetic_examples(predictor.config, str(tmp_path), count=2)
  assert len(examples) == 2
  for support, mask, queries in examples:
    s = predictor_lib.load_support(support, mask)
    assert 0 < np.mean(s.mask == 1) < 1
    assert len(queries) == 1 and predictor_lib.read_image(queries[0]).ndim == 3
  config = predictor.config.copy_and_resolve_references()
  config.data.dataset = "pascal5i"
  assert demo.synthetic_examples(config, str(tmp_path)) == []


# ----------------------------------------------------------------------------- the script


def _script(*args, **kwargs):
  return subprocess.run([sys.executable, os.path.join(REPO, "scripts", "demo.py"), *args],
                        capture_output=True, text=True, timeout=120, cwd=REPO, **kwargs)


def test_script_help_and_usage():
  out = _script("--help")
  assert "127.0.0.1" in out.stdout and "localhost" in out.stdout, out.stdout
  out = _script("--port=1")
  assert out.returncode == 2
  assert "give exactly one of --workdir" in out.stderr
  out = _script("--checkpoint=model.msgpack")
  assert out.returncode == 2 and "--config is required" in out.stderr
  out = _script("--workdir=no/such/run")
  assert out.returncode == 1 and "no/such/run has no config.json" in out.stderr, out.stderr
  out = _script("--checkpoint=no_such.msgpack", "--config=configs/tiny_asgnet.py")
  assert out.returncode == 1 and "no_such.msgpack: no such file" in out.stderr, out.stderr


def test_script_serves_a_checkpoint(predictor, tmp_path):
  """``scripts/demo.py --checkpoint --config`` prints the local URL and serves the page there
  until SIGINT."""
  port = _free_port()
  proc = subprocess.Popen(
      [sys.executable, os.path.join(REPO, "scripts", "demo.py"),
       f"--checkpoint={predictor.source}", "--config=configs/tiny_asgnet.py", f"--port={port}"],
      cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  try:
    lines, deadline = [], time.time() + 120
    while time.time() < deadline:
      line = proc.stdout.readline()
      if not line:
        break
      lines.append(line)
      if line.startswith("open "):
        break
    url = f"http://127.0.0.1:{port}/"
    assert lines and lines[-1].startswith(f"open {url}"), "".join(lines)
    with urllib.request.urlopen(url, timeout=30) as r:
      assert r.status == 200
    with urllib.request.urlopen(url + "config", timeout=30) as r:
      config = json.load(r)
    assert config["title"] == "fss_jax demo"
    assert "Examples" in json.dumps(config)  # the tiny config is procedural: examples offered
  finally:
    proc.send_signal(signal.SIGINT)
    try:
      proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()
  assert proc.returncode is not None


# ----------------------------------------------------------------------------- browser


def _browser_missing() -> str:
  missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
  if missing:
    return (f"{' and '.join(missing)} not found: the browser test drives Debian's chromium "
            "through its chromedriver (apt-get install chromium chromium-driver; .ci/run does)")
  try:
    from selenium import webdriver  # pylint: disable=g-import-not-at-top
  except ImportError:
    return "selenium is not installed (pip install -r requirements-dev.txt)"
  del webdriver
  return ""


@pytest.fixture
def browser(tmp_path):
  from selenium import webdriver  # pylint: disable=g-import-not-at-top
  from selenium.webdriver.chrome.service import Service  # pylint: disable=g-import-not-at-top
  options = webdriver.ChromeOptions()
  options.binary_location = CHROMIUM
  for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              "--disable-quic", "--no-first-run", "--no-default-browser-check",
              "--disable-background-networking", "--disable-component-update",
              "--disable-sync", "--disable-extensions", "--disable-default-apps",
              "--window-size=1400,2000", f"--user-data-dir={tmp_path / 'chromium-profile'}",
              # Any host but the loopback fails to resolve: the page must load from the app.
              "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"):
    options.add_argument(arg)
  options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
  # An explicit driver path: selenium does not run its Selenium Manager (no download).
  driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
  yield driver
  driver.quit()
  shutil.rmtree(tmp_path / "chromium-profile", ignore_errors=True)


@pytest.mark.skipif(bool(_browser_missing()), reason=_browser_missing() or "-")
def test_browser_upload_and_run(app, browser, files, predictor):
  """The page in Chromium: Run with nothing shows the no-support message; a second support slot
  comes and goes; then upload support 1's image and mask file and a query, Run, and the
  prediction appears at the query's size, equal to the library's; every request the page made
  went to the app."""
  from selenium.webdriver.common.by import By  # pylint: disable=g-import-not-at-top
  from selenium.webdriver.support.ui import WebDriverWait  # pylint: disable=g-import-not-at-top
  browser.get(app.local_url)
  WebDriverWait(browser, 60).until(
      lambda d: d.find_elements(By.CSS_SELECTOR, "#support-1 input[type=file]"))

  def click_run():
    browser.execute_script("arguments[0].click()", browser.find_element(By.ID, "run"))

  def page_says(text):
    return lambda d: text in d.execute_script("return document.body.innerText")

  click_run()
  WebDriverWait(browser, 30).until(page_says(demo.NO_SUPPORT))
  # "Add a support" shows the second slot (hidden until then); "Remove" hides it again.
  shown = "const e = document.querySelector('#support-2'); return !!(e && e.offsetParent)"
  assert not browser.execute_script(shown)
  buttons = {b.text: b for b in browser.find_elements(By.TAG_NAME, "button")}
  buttons["Add a support"].click()
  WebDriverWait(browser, 10).until(lambda d: d.execute_script(shown))
  buttons["Remove the last support"].click()
  WebDriverWait(browser, 10).until(lambda d: not d.execute_script(shown))

  browser.find_element(By.CSS_SELECTOR, "#support-1 input[type=file]").send_keys(
      files["support1"])
  browser.find_element(By.CSS_SELECTOR, "#mask-1 input[type=file]").send_keys(files["mask1"])
  browser.find_element(By.CSS_SELECTOR, "#queries input[type=file]").send_keys(files["query1"])
  # Uploaded: their names are listed (the stem and the extension in separate elements).
  WebDriverWait(browser, 30).until(page_says("query1"))
  WebDriverWait(browser, 30).until(page_says("support1_mask"))
  click_run()
  size = WebDriverWait(browser, 240, poll_frequency=0.5).until(lambda d: d.execute_script(
      "const i = document.querySelector('#overlays img');"
      "return i && i.complete && i.naturalWidth > 0 ? [i.naturalWidth, i.naturalHeight] : null"))
  query = predictor_lib.read_image(files["query1"])
  assert size == [query.shape[1], query.shape[0]]
  # The picture shown is the library's overlay of the same inputs: the support image went
  # through the browser's editor canvas unchanged.
  src = browser.execute_script("return document.querySelector('#overlays img').src")
  assert src.startswith(app.local_url)
  with urllib.request.urlopen(src, timeout=30) as r:
    shown = cv2.imdecode(np.frombuffer(r.read(), np.uint8), cv2.IMREAD_COLOR)
  [want] = predictor.predict([predictor_lib.load_support(files["support1"], files["mask1"])],
                             [query])
  np.testing.assert_array_equal(cv2.cvtColor(shown, cv2.COLOR_BGR2RGB),
                                predictor_lib.overlay(want))
  WebDriverWait(browser, 30).until(page_says("query1_mask"))  # the download list
  assert "1-shot" in browser.find_element(By.ID, "message").text

  requested = set()
  for entry in browser.get_log("performance"):
    message = json.loads(entry["message"])["message"]
    if message["method"] == "Network.requestWillBeSent":
      requested.add(message["params"]["request"]["url"])
  web = [u for u in requested if u.startswith(("http:", "https:", "ws:", "wss:"))]
  assert web and all(u.startswith(app.local_url) for u in web), sorted(web)
