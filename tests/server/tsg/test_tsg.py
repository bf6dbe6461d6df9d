"""TSGs: 10-digit ids, a tree, sibling names unique, subtree visibility."""

from __future__ import annotations

import re

from tests.support import Api, refused_once


def test_child_tsgs_form_a_tree(api: Api) -> None:
    parent = api.create_tsg()
    child = api.create_tsg(parent=parent["id"])
    grandchild = api.create_tsg(parent=child["id"])
    for tsg in (parent, child, grandchild):
        assert re.fullmatch(r"[1-9]\d{9}", tsg["id"])
    assert (parent["depth"], child["depth"], grandchild["depth"]) == (1, 2, 3)
    assert child["parent_id"] == parent["id"]
    tree = api.ok(
        api.http.get("/api/v1/tsgs/tree", params={"root": parent["id"]}, headers=api.admin)
    )
    assert tree == [
        {
            "id": parent["id"],
            "name": parent["name"],
            "children": [
                {
                    "id": child["id"],
                    "name": child["name"],
                    "children": [
                        {"id": grandchild["id"], "name": grandchild["name"], "children": []}
                    ],
                }
            ],
        }
    ]
    shown = api.ok(api.http.get(f"/api/v1/tsgs/{child['id']}", headers=api.admin))
    assert shown["name"] == child["name"]
    full = api.ok(api.http.get("/api/v1/tsgs/tree", headers=api.admin))
    assert len(full) == 1
    assert full[0]["id"] == api.root_tsg_id


def test_sibling_names_are_unique_but_cousins_may_share(api: Api) -> None:
    a, b = api.create_tsg(), api.create_tsg()
    api.create_tsg(name="builds", parent=a["id"])
    api.create_tsg(name="builds", parent=b["id"])
    with refused_once(api, reason="name_taken"):
        r = api.http.post(
            "/api/v1/tsgs", json={"name": "builds", "parent_id": a["id"]}, headers=api.admin
        )
        assert r.status_code == 409


def test_unknown_parent_and_unknown_tsg(api: Api) -> None:
    with refused_once(api, reason="tsg_not_found"):
        r = api.http.post(
            "/api/v1/tsgs", json={"name": "x", "parent_id": "1234567890"}, headers=api.admin
        )
        assert r.status_code == 404
    assert api.http.get("/api/v1/tsgs/0000000000", headers=api.admin).status_code == 404


def test_bad_names_are_refused(api: Api) -> None:
    for name in ("", "x" * 129):
        r = api.http.post("/api/v1/tsgs", json={"name": name}, headers=api.admin)
        assert r.status_code == 400
        assert r.json()["code"] == "validation_failed"
