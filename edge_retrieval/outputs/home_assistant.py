"""What Home Assistant sees of the device over MQTT (published by edge_retrieval/outputs/mqtt.py): the retained
match state of the latest lookup, and the discovery messages that make the device and its entities.

Why one retained JSON message per lookup on ``match``: Home Assistant writes an entity's state once per MQTT
message, so when the state and the attributes come in the same message, a lookup is one state change (two
topics made two: the attributes, then the state); and being retained, the attributes are back after a Home
Assistant restart together with the state. Every sensor (match, label, score, items in view, last lookup) reads
its value out of that one message with a template.

"No match" is an empty state (``""``) for the match and label sensors — not a word that could be an item's id —
and "unknown" for the score (Home Assistant's numeric sensors have no empty state).
"""
from __future__ import annotations

from edge_retrieval import __version__
from edge_retrieval.core.config import MqttConfig

ORIGIN = {"name": "edge-retrieval", "sw_version": __version__}


def match_state(event: dict) -> dict:
    """The retained state of the latest lookup: its event (edge_retrieval/outputs/sinks.py ``lookup_event``: id
    and label ``null`` without a match) plus ``items_in_view``, the name Home Assistant's sensor reads for the
    event's ``items``."""
    return {**event, "items_in_view": event["items"]}


def discovery_messages(config: MqttConfig, device_id: str, topics: dict[str, str],
                       page_url: str | None) -> dict[str, dict]:
    """Home Assistant MQTT discovery, keyed by the retained config topics: one device (its software version and
    a link to its page) with sensors for the current match, its label, its score, the items in view and the time
    of the last lookup, a diagnostic camera (connectivity) and catalog size, and the "Look up now" button.
    Every entity carries ``qos`` (Home Assistant subscribes, and presses the button, at ``mqtt.qos``) and the
    shared availability."""
    oid, p = device_id, config.discovery_prefix
    device = {"identifiers": [f"edge_retrieval_{oid}"], "name": config.device_name or oid,
              "manufacturer": "edge-retrieval", "model": "Edge image-retrieval appliance", "sw_version": __version__}
    if page_url:
        device["configuration_url"] = page_url
    common = {"availability_topic": topics["availability"], "payload_available": "online",
              "payload_not_available": "offline", "qos": config.qos, "device": device, "origin": ORIGIN}
    match = {**common, "state_topic": topics["match"]}
    state = {**common, "state_topic": topics["state"], "entity_category": "diagnostic"}

    def sensor(key: str, name: str, template: str, **extra) -> tuple[str, dict]:
        return f"{p}/sensor/{oid}/{key}/config", {**match, "name": name, "unique_id": f"{oid}_{key}",
                                                  "value_template": template, **extra}

    return dict([
        sensor("match", "Current match", "{{ value_json.id or '' }}", icon="mdi:image-search",
               json_attributes_topic=topics["match"]),
        sensor("label", "Label", "{{ value_json.label or '' }}", icon="mdi:tag-text"),
        sensor("score", "Score", "{{ value_json.score }}", icon="mdi:gauge", state_class="measurement",
               suggested_display_precision=3),
        sensor("items_in_view", "Items in view", "{{ value_json.items_in_view }}", icon="mdi:counter",
               state_class="measurement"),
        sensor("last_lookup", "Last lookup", "{{ value_json.time }}", device_class="timestamp"),
        (f"{p}/binary_sensor/{oid}/camera/config", {
            **state, "name": "Camera", "unique_id": f"{oid}_camera", "device_class": "connectivity",
            "value_template": "{{ 'ON' if value_json.camera_ok else 'OFF' }}"}),
        (f"{p}/sensor/{oid}/catalog_items/config", {
            **state, "name": "Catalog items", "unique_id": f"{oid}_catalog_items", "icon": "mdi:bookshelf",
            "value_template": "{{ value_json.index_items }}", "state_class": "measurement"}),
        (f"{p}/button/{oid}/lookup/config", {
            **common, "name": "Look up now", "unique_id": f"{oid}_lookup_now", "icon": "mdi:camera-iris",
            "command_topic": topics["command"], "payload_press": "PRESS"}),
    ])
