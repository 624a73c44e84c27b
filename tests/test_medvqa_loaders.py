"""Loaders on fixtures written in each source's published layout (tests/fixtures/medvqa/build_fixtures.py)."""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import pytest

from hf_vgrefine.medvqa import (
    load_benchmark,
    load_bundle,
    mmmu_med,
    omnimedvqa,
    open_image,
    path_vqa,
    pmc_vqa,
    prepare_items,
    slake,
    vqa_rad,
)

FIXTURES = Path(__file__).parent / "fixtures" / "medvqa"


def _builder():
    spec = importlib.util.spec_from_file_location("medvqa_build_fixtures", FIXTURES / "build_fixtures.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return _builder().write_all(tmp_path_factory.mktemp("medvqa_data"))


def _all_images_open(items):
    for it in items:
        for im in it.images:
            assert open_image(im).mode == "RGB"


def test_bundle(data):
    items = load_bundle(data / "bundle")
    assert len(items) == 11 and all(it.bundle_identical for it in items)
    assert [it.id for it in items[:2]] == ["VQA-RAD/0", "VQA-RAD/1"]
    by_id = {it.id: it for it in items}
    assert by_id["PathVQA/3"].options == ["yes", "no"] and len(by_id["PathVQA/3"].images) == 1  # literal + str image
    assert by_id["MMMU-Medical-Tr/6"].options == ["beta blocker", "statin", "ACE inhibitor"]
    assert len(by_id["MMMU-Medical-Tr/6"].images) == 2
    assert by_id["SLAKE/7"].answer_type == "open" and by_id["OmniMedVQA/5"].subset == "ACRIMA"
    assert all(isinstance(im, str) and os.path.isabs(im) for it in items for im in it.images)  # extracted from zip
    _all_images_open(items)
    p = prepare_items(items)
    assert p.removed == {"open": 1, "no_options": 1, "duplicate": 1} and len(p.items) == 8
    assert [it.dataset for it in load_bundle(data / "bundle" / "medical_multimodel_evaluation_data.json",
                                             datasets=["PMC-VQA"])] == ["PMC-VQA", "PMC-VQA"]


def test_bundle_with_extracted_images_dir(data, tmp_path):
    shutil.copy(data / "bundle" / "medical_multimodel_evaluation_data.json", tmp_path)
    import zipfile

    with zipfile.ZipFile(data / "bundle" / "images.zip") as zf:
        zf.extractall(tmp_path / "unpacked")
    items = load_bundle(tmp_path, images_dir=tmp_path / "unpacked")
    assert items[0].images[0] == str(tmp_path / "unpacked" / "images" / "vqarad_0.png")
    _all_images_open(items)


def test_vqa_rad_bytes_and_paths(data):
    items = vqa_rad(data / "vqa-rad")  # folder with data/test-*.parquet and data/train-*.parquet
    assert [it.id for it in items] == [f"vqa-rad/test/{i}" for i in range(4)]
    assert [type(it.images[0]) for it in items] == [bytes, bytes, str, bytes]
    assert items[2].images[0] == str((data / "vqa-rad" / "imgs" / "synpic_path.png").resolve())
    assert items[1].answer == "no" and items[1].options == ["yes", "no"] and items[1].answer_type == "closed"
    assert items[2].answer_type == "open" and items[2].options == [] and items[2].answer == "right upper lobe"
    assert not any(it.bundle_identical for it in items) and items[0].modality == "radiology"
    _all_images_open(items)
    assert len(vqa_rad(data / "vqa-rad", split="train")) == 1


def test_path_vqa_single_file(data):
    items = path_vqa(data / "path-vqa" / "test.parquet")
    assert [(it.answer_type, it.answer) for it in items] == [("closed", "yes"), ("open", "granuloma"), ("closed", "no")]
    assert items[0].dataset == "PathVQA"
    _all_images_open(items)


def test_slake_json_and_zip(data):
    items = slake(data / "slake")
    assert [it.id for it in items] == ["slake/test/11", "slake/test/12", "slake/test/13", "slake/test/15"]
    yes, closed_text, open_, no = items
    assert yes.options == ["yes", "no"] and yes.answer == "yes" and yes.modality == "CT"
    assert closed_text.answer_type == "closed" and closed_text.options == []   # dropped by the MCQ filter
    assert open_.answer_type == "open" and no.answer == "no"
    assert yes.meta["location"] == "Lung" and yes.meta["source_answer_type"] == "closed"
    _all_images_open(items)
    assert len(slake(data / "slake", lang=None)) == 5
    assert prepare_items(items).removed == {"no_options": 1, "open": 1}


def test_pmc_vqa_csv(data):
    items = pmc_vqa(data / "pmc-vqa")
    assert items[0].options == ["CT", "MRI", "PET", "X-ray"] and items[0].answer == "MRI"
    assert items[1].answer == "Left atrium" and items[2].options[3] == "None" and items[2].answer == "None"
    assert items[0].id == "pmc-vqa/test_clean/0" and isinstance(items[0].images[0], str)
    _all_images_open(items)
    assert len(pmc_vqa(data / "pmc-vqa" / "test_clean.csv")) == 3


def test_omnimedvqa_dir(data):
    items = omnimedvqa(data / "omnimedvqa")  # finds OmniMedVQA/QA_information/Open-access below
    assert [it.id for it in items] == ["omnimedvqa/ACRIMA_0000", "omnimedvqa/ACRIMA_0001", "omnimedvqa/Chest CT Scan_0000"]
    assert items[1].options == ["Yes", "No"] and items[1].answer == "No"
    assert items[2].modality == "CT" and items[2].subset == "Chest CT Scan" and items[0].modality == "Fundus Photography"
    _all_images_open(items)
    assert len(omnimedvqa(data / "omnimedvqa" / "OmniMedVQA", datasets=["ACRIMA"])) == 2


def test_mmmu_parquet(data):
    items = mmmu_med(data / "mmmu-med")  # only the subjects present locally
    mc, open_, pharm = items
    assert mc.options == ["Pneumothorax", "Pleural effusion", "Atelectasis", "Normal"] and mc.answer == "Pleural effusion"
    assert mc.subset == "Clinical_Medicine" and mc.modality == "X-Rays" and mc.meta["answer_letter"] == "B"
    assert open_.answer_type == "open" and len(open_.images) == 2 and open_.answer == "aorta"
    assert pharm.answer == "Acetic acid" and pharm.dataset == "MMMU-Med"
    assert all(isinstance(im, bytes) for it in items for im in it.images)
    _all_images_open(items)


def test_registry_and_hub_defaults(data, monkeypatch):
    assert len(load_benchmark("PathVQA", source=data / "path-vqa" / "test.parquet")) == 3
    assert len(load_benchmark("slake", data_dir=data)) == 4
    with pytest.raises(ValueError, match="unknown benchmark"):
        load_benchmark("nope")

    # Hub ids are the defaults: files come through hf_hub_download(repo_type="dataset")
    calls = []
    files = {("FreedomIntelligence/Medical_Multimodal_Evaluation_Data", "medical_multimodel_evaluation_data.json"):
             data / "bundle" / "medical_multimodel_evaluation_data.json",
             ("FreedomIntelligence/Medical_Multimodal_Evaluation_Data", "images.zip"): data / "bundle" / "images.zip",
             ("BoKelvin/SLAKE", "test.json"): data / "slake" / "test.json",
             ("BoKelvin/SLAKE", "imgs.zip"): data / "slake" / "imgs.zip"}

    def fake_download(repo_id, filename, repo_type=None, revision=None, **kw):
        calls.append((repo_id, filename, repo_type))
        return str(files[(repo_id, filename)])

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    assert len(load_benchmark("bundle")) == 11
    assert len(load_benchmark("slake")) == 4
    assert all(c[2] == "dataset" for c in calls) and len(calls) == 4

    import datasets

    real = datasets.load_dataset
    seen = []

    def fake_load_dataset(path, *args, **kw):
        if path == "flaviagiammarino/vqa-rad":
            seen.append((path, kw.get("split")))
            return real(str(data / "vqa-rad"), split=kw["split"])
        return real(path, *args, **kw)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert len(load_benchmark("vqa-rad")) == 4 and seen == [("flaviagiammarino/vqa-rad", "test")]


def test_omnimedvqa_from_archive(data, tmp_path):
    shutil.make_archive(str(tmp_path / "OmniMedVQA"), "zip", root_dir=data / "omnimedvqa", base_dir="OmniMedVQA")
    items = omnimedvqa(tmp_path)  # only OmniMedVQA.zip there: extracted once into the cache
    assert len(items) == 3 and all(os.path.exists(im) for it in items for im in it.images)
    _all_images_open(items)
