"""ControlNet through SNS on the embedded stack: a unit whose image is an s3:// link."""

from __future__ import annotations

import io
import tempfile
import time
from pathlib import Path

from PIL import Image, ImageDraw

from sdeks.callback import Manifest
from tests.e2e.test_pipeline import envelope, new_id, read_object, run


def test_controlnet_unit_with_an_s3_link_end_to_end(local, client):
    from runtime.tiny_controlnet import make_tiny_controlnet
    from sdeks.local import upload_folder

    s3 = local.client("s3")
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_tiny_controlnet(Path(tmp) / "tiny-cn-sd15", family="sd15")
        upload_folder(s3, folder, local.resources.models_bucket, "ControlNet/tiny-cn-sd15/")
    hint = Image.new("RGB", (64, 64))
    ImageDraw.Draw(hint).rectangle((16, 16, 48, 48), fill=(255, 255, 255))
    buf = io.BytesIO()
    hint.save(buf, format="PNG")
    s3.put_object(Bucket=local.input_bucket, Key="cn-hint.png", Body=buf.getvalue())
    # The pod re-lists the bucket for an unknown name at most every 10 s.
    time.sleep(11)

    plain_id, cn_id = new_id("cn-plain"), new_id("cn-unit")
    unit = {
        "module": "canny",
        "model": "tiny-cn-sd15",
        "image": f"s3://{local.input_bucket}/cn-hint.png",  # resolved by the dispatcher
    }
    scripts = {"sd_model_checkpoint": "tiny-sd15", "controlnet": {"args": [unit]}}
    results = run(client, [envelope(plain_id), envelope(cn_id, alwayson_scripts=scripts)])
    plain, with_cn = results[plain_id], results[cn_id]
    assert plain.status == "succeeded", plain.error
    assert with_cn.status == "succeeded", with_cn.error
    assert read_object(local, with_cn.image_url[0]) != read_object(local, plain.image_url[0])
    manifest = Manifest.model_validate_json(read_object(local, with_cn.output_url))
    assert manifest.info is not None
    assert manifest.info["extra_generation_params"]["ControlNet 0"].startswith(
        "Module: canny, Model: tiny-cn-sd15"
    )
