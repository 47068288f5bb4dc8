"""What a real Home Assistant makes of the appliance (run by benchmarks/home_assistant.sh, inside the Debian trixie
root, with Home Assistant's own Python: aiohttp is there). Three phases, the report growing in one JSON file:

  setup     onboarding (the first user, a token) and the MQTT integration, through the REST API
  watch     while `serve` starts: the device and its entities (registry: sw_version, configuration_url,
            entity_category), how soon the camera is "on" after the device streams, state changes per lookup,
            "no match" as a state, the "Look up now" button
  restarted after Home Assistant restarted: the match sensor's state and attributes are back
"""
from __future__ import annotations

import argparse
import asyncio
import json
import time
import urllib.request
from datetime import datetime
from pathlib import Path

import aiohttp

CLIENT_ID = "http://127.0.0.1/bench"
SENSORS = ("match", "label", "score", "items_in_view", "last_lookup")


def load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


async def wait_http(session: aiohttp.ClientSession, url: str, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            async with session.get(url) as r:
                if r.status < 500:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(1)
    raise SystemExit(f"{url} did not answer within {timeout_s} s")


class Ws:
    """Home Assistant's websocket API: one authenticated connection, numbered commands."""

    def __init__(self, session: aiohttp.ClientSession, ha: str, token: str):
        self.session, self.url, self.token, self.n = session, ha.replace("http", "ws") + "/api/websocket", token, 0

    async def __aenter__(self) -> Ws:
        self.ws = await self.session.ws_connect(self.url)
        await self.ws.receive_json()
        await self.ws.send_json({"type": "auth", "access_token": self.token})
        assert (await self.ws.receive_json())["type"] == "auth_ok"
        return self

    async def __aexit__(self, *exc) -> None:
        await self.ws.close()

    async def send(self, **msg) -> int:
        self.n += 1
        await self.ws.send_json({"id": self.n, **msg})
        return self.n

    async def call(self, **msg):
        n = await self.send(**msg)
        while True:
            reply = await self.ws.receive_json()
            if reply.get("id") == n and reply["type"] == "result":
                if not reply["success"]:
                    raise SystemExit(f"{msg['type']}: {reply.get('error')}")
                return reply["result"]


async def setup(args, state: dict) -> None:
    async with aiohttp.ClientSession() as s:
        await wait_http(s, args.ha + "/api/onboarding")
        async with s.post(args.ha + "/api/onboarding/users", json={
                "client_id": CLIENT_ID, "name": "Bench", "username": "bench", "password": "bench-password-1",
                "language": "en"}) as r:
            code = (await r.json())["auth_code"]
        async with s.post(args.ha + "/auth/token", data={"grant_type": "authorization_code", "code": code,
                                                         "client_id": CLIENT_ID}) as r:
            short = (await r.json())["access_token"]
        async with Ws(s, args.ha, short) as ws:
            state["token"] = await ws.call(type="auth/long_lived_access_token", client_name="bench", lifespan=30)
        head = {"Authorization": f"Bearer {state['token']}"}
        async with s.post(args.ha + "/api/config/config_entries/flow", headers=head,
                          json={"handler": "mqtt", "show_advanced_options": False}) as r:
            flow = await r.json()
        async with s.post(f"{args.ha}/api/config/config_entries/flow/{flow['flow_id']}", headers=head,
                          json={"broker": "127.0.0.1", "port": args.broker_port}) as r:
            done = await r.json()
        state["mqtt_entry"] = done.get("type")
        print(f"onboarded; MQTT integration: {done.get('type')}", flush=True)


def device_api(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


async def watch(args, state: dict) -> None:
    head = {"Authorization": f"Bearer {state['token']}"}
    async with aiohttp.ClientSession(headers=head) as s, Ws(s, args.ha, state["token"]) as ws:
        await ws.send(type="subscribe_events", event_type="state_changed")
        changes: list[dict] = []
        registry: dict = {}

        async def collect(until: float) -> None:
            while time.time() < until:
                try:
                    msg = await asyncio.wait_for(ws.ws.receive_json(), timeout=max(0.1, until - time.time()))
                except asyncio.TimeoutError:
                    return
                if msg.get("type") == "event":
                    d = msg["event"]["data"]
                    if d["entity_id"] in registry.values() and d.get("new_state"):
                        new = d["new_state"]
                        changes.append({"entity": d["entity_id"], "state": new["state"], "t": time.time(),
                                        "changed": new["last_changed"], "attrs": sorted(new["attributes"])})

        # the entities appear once discovery arrives (the device publishes it when it connects)
        deadline = time.time() + 120
        while time.time() < deadline and len(registry) < len(SENSORS) + 3:
            entities = await ws.call(type="config/entity_registry/list")
            registry = {e["unique_id"].removeprefix("bench_"): e["entity_id"]
                        for e in entities if e.get("unique_id", "").startswith("bench_")}
            await collect(time.time() + 0.5)
        entities = {e["entity_id"]: e for e in await ws.call(type="config/entity_registry/list")}
        devices = [d for d in await ws.call(type="config/device_registry/list")
                   if ["mqtt", "edge_retrieval_bench"] in d["identifiers"]]
        dev = devices[0] if devices else {}
        state["device"] = {k: dev.get(k) for k in ("name", "manufacturer", "model", "sw_version", "configuration_url")}
        state["entities"] = {key: {"entity_id": eid, "entity_category": entities[eid].get("entity_category")}
                             for key, eid in sorted(registry.items())}
        state["registry"] = registry

        await collect(time.time() + 20)  # the trigger looks up each of the four views (3 s each)
        button = registry.get("lookup_now")
        if button:
            await ws.call(type="call_service", domain="button", service="press", target={"entity_id": button})
        await collect(time.time() + 5)
        async with s.get(f"{args.ha}/api/states/{registry.get('camera')}") as r:
            cam = await r.json() if r.status == 200 else {}

    history = device_api(args.device + "/api/history?limit=100")["entries"]
    lookups = [e for e in history if e["timestamp"] >= args.serve_started]
    match_changes = [c for c in changes if c["entity"] == registry.get("match")]
    on_since = datetime.fromisoformat(cam["last_changed"]).timestamp() if cam.get("state") == "on" else None
    state["camera"] = {  # the device logs "streaming" at its first frame; Home Assistant's "on" should follow at once
        "state": cam.get("state"), "states_seen": [c["state"] for c in changes if c["entity"] == registry.get("camera")],
        "on_after_device_streaming_s": round(on_since - args.streaming_at, 2) if on_since and args.streaming_at else None,
        "on_after_serve_started_s": round(on_since - args.serve_started, 2) if on_since else None}
    state["lookups"] = {
        "device_lookups": len(lookups), "by_source": sorted({e["source"] for e in lookups}),
        "match_sensor_state_changes": len(match_changes),
        "match_sensor_states": [c["state"] for c in match_changes],
        "no_match_state_seen": [c["state"] for c in match_changes if c["state"] in ("", "unknown", "none")],
        "match_attributes": match_changes[-1]["attrs"] if match_changes else None,
        "other_sensors_last": {k: next((c["state"] for c in reversed(changes) if c["entity"] == registry.get(k)), None)
                               for k in SENSORS if k != "match"}}
    print(json.dumps(state["lookups"], indent=1), flush=True)


async def restarted(args, state: dict) -> None:
    head = {"Authorization": f"Bearer {state['token']}"}
    async with aiohttp.ClientSession(headers=head) as s:
        await wait_http(s, args.ha + "/api/")
        eid = state["registry"].get("match")
        found = None
        for _ in range(120):  # the entity comes back when the MQTT integration has set up again
            async with s.get(f"{args.ha}/api/states/{eid}") as r:
                if r.status == 200:
                    found = await r.json()
                    if found["state"] not in ("unavailable", "unknown"):
                        break
            await asyncio.sleep(1)
    state["after_restart"] = {"state": found and found["state"],
                              "attributes": sorted(found["attributes"]) if found else None}
    state.pop("token")  # the report keeps no credential


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("phase", choices=("setup", "watch", "restarted"))
    p.add_argument("--ha", required=True)
    p.add_argument("--state", type=Path, required=True)
    p.add_argument("--broker-port", type=int)
    p.add_argument("--device")
    p.add_argument("--serve-started", type=float)
    p.add_argument("--streaming-at", type=lambda v: float(v) if v else None)
    args = p.parse_args()
    state = load(args.state)
    asyncio.run({"setup": setup, "watch": watch, "restarted": restarted}[args.phase](args, state))
    args.state.write_text(json.dumps(state, indent=1))


if __name__ == "__main__":
    main()
