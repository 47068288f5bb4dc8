"""The webhook: the lookup event POSTed as JSON to a URL, for systems without MQTT (a sink:
edge_retrieval/outputs/sinks.py)."""
from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request

from edge_retrieval.core.config import WebhookConfig
from edge_retrieval.core.results import LookupResult
from edge_retrieval.core.status import Health
from edge_retrieval.outputs.sinks import DRAIN_S, QueueWorker, default_device_id, lookup_event

log = logging.getLogger(__name__)


class WebhookNotifier(QueueWorker):
    """POSTs the lookup event (``lookup_event``) as JSON to a URL, by default for accepted matches only, with a
    timeout and retries with backoff, from its own thread."""

    def __init__(self, config: WebhookConfig, device_id: str | None = None):
        super().__init__("webhook", config.queue_size)
        self.config = config
        self.device_id = device_id or default_device_id()

    def start(self) -> WebhookNotifier:
        """Start the sending thread."""
        self._start_worker()
        return self

    def stop(self) -> None:
        """Send what is queued (≤ one timeout), then stop. Idempotent; never raises."""
        self._stop_worker(min(self.config.timeout_s, DRAIN_S))

    def publish_lookup(self, result: LookupResult) -> None:
        """Queue the event of an accepted match (or of every lookup with matches_only false); never blocks."""
        if self.config.matches_only and result.match is None:
            return
        try:
            self._offer(json.dumps(lookup_event(result, self.device_id)).encode())
        except Exception:
            log.exception("webhook: could not queue a lookup event")

    def publish_health(self, health: Health) -> None:
        """Health is not sent over the webhook (MQTT's state topic carries it)."""

    def stats(self) -> dict:
        """sent, failed (gave up after the retries), dropped (queue full), queued."""
        n = self._counted()
        return {"sent": n["sent"], "failed": n["failed"], "dropped": n["dropped"], "queued": self._queue.qsize()}

    def register_metrics(self, metrics) -> None:
        """Expose the notifier's counters on the appliance's /metrics (a ``edge_retrieval.outputs.metrics.Metrics``)."""
        metrics.read_at_scrape("appliance_webhook_posts", "Webhook posts by result", "counter",
                               lambda: {k: self.stats()[k] for k in ("sent", "failed", "dropped")}, label="result")

    def _handle(self, body: bytes) -> None:
        c = self.config
        for attempt in range(c.retries + 1):
            if attempt and self._halt.wait(c.retry_backoff_s * 2 ** (attempt - 1)):
                break
            req = urllib.request.Request(c.url, data=body, method="POST",
                                         headers={"Content-Type": "application/json",
                                                  "User-Agent": "edge-retrieval"})
            try:
                with urllib.request.urlopen(req, timeout=c.timeout_s) as resp:
                    resp.read()
                self._count("sent")
                return
            except urllib.error.HTTPError as e:
                why = f"HTTP {e.code}"
                if e.code < 500 and e.code not in (408, 429):  # the receiver refuses this event: retrying won't help
                    break
            except (urllib.error.URLError, OSError) as e:
                why = str(getattr(e, "reason", e))
            log.warning("webhook: POST %s failed (%s), attempt %d of %d", c.url, why, attempt + 1, c.retries + 1)
        self._count("failed")
