"""Path parameters out of the database's range are a 4xx, never a 500 (found by the schemathesis run)."""

import pytest

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("face_id", ["157346317557126762029093442880909869056", "0", "-3"])
def test_face_id_outside_int64_is_refused(gateway, face_id):
    with gateway.client("admin") as c:
        ident = c.post("/v1/identities", json={"external_id": f"path-limits-{face_id[:6]}"}).json()["id"]
        r = c.delete(f"/v1/identities/{ident}/faces/{face_id}")
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"]
    with gateway.client(scope="") as c:
        assert c.get("/healthz").status_code == 200
