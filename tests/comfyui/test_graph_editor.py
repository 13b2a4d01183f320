"""The graph editor (ComfyUI's frontend in headless Chromium): the bundled UI workflows load with no missing
nodes or errors and turn into exactly their API-format twins; our nodes can be created as from the node
library, with every widget; the Status node's web extension shows the live report.

Needs ``node``, Debian's ``chromium`` (``CHROMIUM_PATH``, default /usr/bin/chromium) and ``playwright-core``
from npm (``PLAYWRIGHT_CORE_DIR``: its package folder, or a folder where ``npm install playwright-core`` ran).
``DISTRIFUSION_UPDATE_SCREENSHOT=1`` copies the first workflow's screenshot after its run to ``docs/workflow.png``
(the templates' ``.jpg`` thumbnails are these screenshots too, cropped to the graph and scaled to 768 px).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from comfy_harness import LOADER, SAMPLER, STATUS, stand_in_prompt

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
WORKFLOWS = REPO_ROOT / "example_workflows"
SCREENSHOT = REPO_ROOT / "docs" / "workflow.png"
OUR_EXTENSION = "/extensions/ComfyUI-WanVideo-DistriFusion/"
COMFY_ORG = "https://huggingface.co/Comfy-Org/"
COMFY_ORG_WAN = (
    f"{COMFY_ORG}Wan_2.1_ComfyUI_repackaged/resolve/main/split_files/",
    f"{COMFY_ORG}Wan_2.2_ComfyUI_Repackaged/resolve/main/split_files/",
)
"""Where ComfyUI's own Wan templates download their models from (the Comfy-Org repackaged files)."""
MODEL_FILE_WIDGETS = {
    "CLIPLoader": ("text_encoders", [0]),
    "VAELoader": ("vae", [0]),
    "CLIPVisionLoader": ("clip_vision", [0]),
    "OfficialDistriFusionLora": ("loras", [0]),
    LOADER: ("diffusion_models", [0, 16]),  # model, second model
}
"""Nodes that load a model file: the folder and which widgets name files (\"none\" for no second model)."""


def browser_tools() -> tuple[str, str, str]:
    node = shutil.which("node")
    chromium = os.environ.get("CHROMIUM_PATH") or shutil.which("chromium") or "/usr/bin/chromium"
    playwright = os.environ.get("PLAYWRIGHT_CORE_DIR", "")
    missing = [
        name
        for name, ok in (
            ("node", node),
            ("chromium", Path(chromium).exists()),
            ("PLAYWRIGHT_CORE_DIR", playwright and Path(playwright).exists()),
        )
        if not ok
    ]
    if missing:
        reason = f"graph editor test needs {', '.join(missing)} (apt-get install chromium; npm install playwright-core)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return node, chromium, playwright


def offline_free(errors: list[str]) -> list[str]:
    """The page's errors less those of the missing-models dialog asking huggingface.co for the file sizes, which
    this machine cannot reach."""
    return [e for e in errors if COMFY_ORG not in e and not e.startswith("console: Error fetching file size")]


def run_in_page_templates() -> list:
    """The Wan 2.1 text-to-video templates, which the page runs with stand-ins. (The Wan 2.2 / image-to-video
    templates are run through the HTTP API with stand-ins in test_wan_templates.py; here they are loaded, converted,
    checked for their models' download information and shown in the template browser.)"""
    return sorted(WORKFLOWS.glob("Wan 2.1 T2V *.json"))


def stand_in_prompts() -> dict[str, dict]:
    """Each template's API twin with tiny stand-ins, at a clip size of the template's aspect ratio (so the video
    preview takes the room it takes in a real run), 1 frame."""
    prompts = {}
    for path in run_in_page_templates():
        twin = json.loads((WORKFLOWS / "api" / path.name).read_text())
        sampler = next(n["inputs"] for n in twin.values() if n["class_type"] == SAMPLER)
        size = (
            {"width": 80, "height": 48} if sampler["width"] / sampler["height"] < 1.7 else {"width": 112, "height": 64}
        )
        prompts[path.name] = stand_in_prompt(twin, f"editor/{path.stem}", **size, length=1)
    return prompts


@pytest.fixture(scope="module")
def editor(comfy, tmp_path_factory):
    node, chromium, playwright = browser_tools()
    shots = tmp_path_factory.mktemp("screenshots")
    env = dict(os.environ, PLAYWRIGHT_CORE_DIR=playwright, CHROMIUM_PATH=chromium)
    comfy.post("/api/settings/Comfy.Minimap.Visible", False)  # screenshots without the overlay in the corner
    stand_ins = shots / "stand_in_prompts.json"
    stand_ins.write_text(json.dumps(stand_in_prompts()))
    result = subprocess.run(
        [node, str(HERE / "graph_editor.mjs"), comfy.url, str(WORKFLOWS), str(shots), str(stand_ins)],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert result.returncode == 0, f"graph editor script failed:\n{result.stderr[-4000:]}"
    report = json.loads(result.stdout.strip().splitlines()[-1])
    report["screenshots"] = shots
    first = run_in_page_templates()[0].stem
    if os.environ.get("DISTRIFUSION_UPDATE_SCREENSHOT") == "1":
        SCREENSHOT.parent.mkdir(exist_ok=True)
        shutil.copyfile(shots / f"{first}.after_run.png", SCREENSHOT)
    return report


def test_bundled_workflows_load_without_missing_nodes_or_errors(editor):
    shipped = sorted(p.name for p in WORKFLOWS.glob("*.json"))
    assert sorted(editor["workflows"]) == shipped and len(shipped) >= 3
    for name, entry in editor["workflows"].items():
        assert entry["missing"] == [], f"{name}: missing node types {entry['missing']}"
        assert entry["nodes_with_errors"] == [], name
        assert entry["node_count"] == entry["expected_node_count"], name
        # every template names its models (none is installed on the test server)
        assert [d.split("\n", 1)[0] for d in entry["dialogs"]] == ["Missing Models"], f"{name}: {entry['dialogs']}"
        # LoadImage's example file (the user's own image) is not in the test server's input folder: its preview 404s
        errors = [e for e in offline_free(entry["errors"]) if "404" not in e or "/api/view?type=input&" not in e]
        assert errors == [], f"{name}: page errors {errors}"
        assert (editor["screenshots"] / name.replace(".json", ".png")).stat().st_size > 10_000


def test_missing_models_dialog_lists_the_templates_models_with_downloads(editor):
    """Each template carries its models' download information as ComfyUI's own Wan templates do (per node
    ``properties.models``: name, url, directory of the Comfy-Org repackaged files; both experts on a two-expert
    Loader, the 4-step LoRAs on our LoRA nodes), so the frontend's missing models dialog lists them (none is
    installed on the test server)."""
    for path in sorted(WORKFLOWS.glob("*.json")):
        name, entry = path.name, editor["workflows"][path.name]
        workflow = json.loads(path.read_text())
        models = [m for node in workflow["nodes"] for m in node.get("properties", {}).get("models", [])]
        for node in workflow["nodes"]:
            listed = node.get("properties", {}).get("models", [])
            if node["type"] in MODEL_FILE_WIDGETS:
                directory, widgets = MODEL_FILE_WIDGETS[node["type"]]
                files = [node["widgets_values"][i] for i in widgets if node["widgets_values"][i] != "none"]
                assert [(m["name"], m["directory"]) for m in listed] == [(f, directory) for f in files], (name, node)
            for model in listed:
                assert model["name"] in node["widgets_values"], (name, model)  # the frontend matches on this
                assert model["url"].startswith(COMFY_ORG_WAN) and model["name"] in model["url"], model
        (dialog,) = entry["dialogs"]
        for model in models:
            assert f"{model['directory']} / {model['name']}" in dialog, (name, dialog)


def test_ui_workflows_turn_into_their_api_twins(editor):
    for name, entry in editor["workflows"].items():
        twin = json.loads((WORKFLOWS / "api" / name).read_text())
        strip = {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in twin.items()}
        prompt = {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in entry["prompt"].items()}
        assert prompt == strip, name


def test_our_nodes_created_from_the_library_have_every_widget(editor):
    created = editor["created"]
    loader = created[LOADER]
    assert loader["title"] == "🎯 Official DistriFusion Model Loader"
    assert loader["category"] == "WanVideoWrapper/Official DistriFusion"
    assert loader["widgets"] == [
        "model",
        "precision",
        "quantization",
        "gpus",
        "patch_size",
        "patch_overlap",
        "split_mode",
        "world_size",
        "rank",
        "parallel_mode",
        "cfg_parallel",
        "warmup_steps",
        "attention",
        "kv_dtype",
        "comm_backend",
        "compile",
        "second_model",
        "weights",
        "offload",
    ]
    assert loader["values"]["patch_size"] == 64 and loader["values"]["gpus"] == 1
    assert loader["values"]["second_model"] == "none" and loader["values"]["weights"] == "auto"
    assert loader["values"]["offload"] is False
    assert loader["outputs"] == ["model:DISTRIFUSION_WAN_MODEL", "second model:DISTRIFUSION_WAN_MODEL"]
    sampler = created[SAMPLER]
    assert sampler["title"] == "🎯 Official DistriFusion Sampler"
    for widget in (
        "steps",
        "cfg",
        "shift",
        "seed",
        "sampler",
        "scheduler",
        "denoise",
        "width",
        "height",
        "length",
        "sync_frequency",
    ):
        assert widget in sampler["widgets"], widget
    assert {"model:DISTRIFUSION_WAN_MODEL", "positive:CONDITIONING", "negative:CONDITIONING", "latent:LATENT"} <= set(
        sampler["inputs"]
    )
    assert sampler["outputs"] == ["LATENT:LATENT"]
    status = created[STATUS]
    assert status["title"] == "🎯 Official DistriFusion Status"
    assert status["widgets"] == ["status_report"]  # the report display the web extension adds
    # the display widget is not part of the prompt the editor sends
    status_prompt = [v for v in editor["created_prompt"].values() if v["class_type"] == STATUS]
    assert status_prompt and "status_report" not in status_prompt[0]["inputs"]


def test_status_extension_shows_the_live_report(editor):
    text = editor["status_text"] or ""
    assert "🎯 Official DistriFusion Status" in text and "🔌 Comm" in text, text
    ours = [e for e in editor["startup_errors"] if OUR_EXTENSION in e]
    assert ours == [], ours


def test_status_node_from_the_library_shows_the_whole_report(editor):
    """Added from the node library the Status node is big enough for its report (ComfyUI's default for a node
    with one text box is 225 x 96, which squashes it into one line)."""
    box = editor["status_box"]
    assert box["size"][0] >= 480 and box["size"][1] >= 300, box
    assert box["lines"] >= 8, box  # the live report, several lines
    assert box["text_height"] >= 0.9 * box["text_scroll_height"], f"the report does not fit its box: {box}"


def overlaps(a: list[float], b: list[float], margin: float = 0.0) -> bool:
    return (
        a[0] < b[0] + b[2] + margin
        and b[0] < a[0] + a[2] + margin
        and a[1] < b[1] + b[3] + margin
        and b[1] < a[1] + a[3] + margin
    )


def test_templates_stay_readable_after_a_run(editor):
    """Each template, run with tiny stand-ins from the page: outputs appear (the Sampler's preview, the video, the
    Status report), no two nodes overlap, and the whole graph fits the canvas at 100%. (The screenshots
    ``<name>.after_run.png`` show it.)"""
    for path in run_in_page_templates():
        name, entry = path.name, editor["workflows"][path.name]
        assert entry.get("run") == "execution_success", (name, entry.get("run"))
        after = entry["after_run"]
        nodes = after["nodes"]
        for i, a in enumerate(nodes):
            for b in nodes[i + 1 :]:
                assert not overlaps(a["rect"], b["rect"]), (
                    f"{name}: {a['title']} {a['rect']} overlaps {b['title']} {b['rect']}"
                )
        # at 100% with its corner 16 px inside the canvas (right of the side bar, below the menu), all of it shows
        assert after["scale"] == 1
        right = max(n["rect"][0] + n["rect"][2] for n in nodes) + after["offset"][0]
        bottom = max(n["rect"][1] + n["rect"][3] for n in nodes) + after["offset"][1]
        width, height = after["canvas"]
        assert right <= width - 8 and bottom <= height - 8, (
            f"{name}: graph reaches ({right}, {bottom}) on {width} x {height}"
        )


def test_template_browser_shows_thumbnails_and_readable_titles(editor):
    """Templates → our pack: each template's ``.jpg`` thumbnail loads (no 404) and its title is its readable file
    name (the frontend titles a custom node's template by its file name)."""
    browser = editor["template_browser"]
    failed = [r for r in editor["template_requests"] if r[0] >= 400]
    assert failed == [], failed
    fetched = {url.rsplit("/", 1)[-1] for status, url in editor["template_requests"] if status == 200}
    for path in sorted(WORKFLOWS.glob("*.json")):
        assert f"{path.stem}.jpg" in fetched, (path.stem, editor["template_requests"])
        shown = [i for i in browser["images"] if i["alt"] == path.stem]
        assert shown and all(i["loaded"] for i in shown), (path.stem, browser["images"])
        assert path.stem in browser["text"], (path.stem, browser["text"][:2000])
