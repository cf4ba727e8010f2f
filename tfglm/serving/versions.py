"""Versions: the models a server serves, each a base path of numbered `tfglm export` versions, loaded and retired
by its version policy (TF Serving's: the latest N, default 1; all; or specific ones) as versions appear on disk.

A new version is loaded and warmed up before it takes traffic; a version that leaves the policy is retired. Each
version runs in a process of its own (`tfglm.serving.version_process`), which ends once the version is retired and
its requests are done: what TensorFlow and XLA hold for a version goes back to the operating system with it, so the
server's memory stays flat however many versions it swaps in.
"""

import logging
import os
import shutil
import time

from google.protobuf import text_format
from tensorflow_serving.apis import get_model_status_pb2
from tensorflow_serving.config import model_server_config_pb2

from tfglm.errors import TfglmError
from tfglm.serving.checks import RequestError
from tfglm.serving.version_process import VersionProcess

log = logging.getLogger("tfglm")
STALE_EXPORT_S = 600  # a `tmp-*` export directory untouched this long is left over from a killed `tfglm export`


def read_model_config(path):
    """{name: ModelConfig} from a TF Serving ModelServerConfig text proto (`--model_config_file`): each model's
    base path, version policy and version labels."""
    try:
        with open(path) as f:
            config = text_format.Parse(f.read(), model_server_config_pb2.ModelServerConfig())
    except (OSError, text_format.ParseError) as e:
        raise TfglmError(f"--model_config_file {path}: {e}") from None
    models = {}
    for model in config.model_config_list.config:
        if not model.name or not model.base_path or model.name in models:
            raise TfglmError(f"--model_config_file {path}: every config needs a name and a base_path, and names "
                             f"must differ ({model.name!r})")
        policy = model.model_version_policy
        if policy.WhichOneof("policy_choice") == "specific" and not policy.specific.versions:
            raise TfglmError(f"--model_config_file {path}: model {model.name}: a specific version policy needs "
                             "versions")
        models[model.name] = model
    if not models:
        raise TfglmError(f"--model_config_file {path}: no model_config_list entries")
    return models


class Model:
    """A model name served from a base path: the versions its version policy asks for, and its version labels."""

    def __init__(self, config, **servable_options):
        self.name, self.base_path = config.name, config.base_path
        self.policy, self.labels = config.model_version_policy, dict(config.version_labels)
        self.servable_options = servable_options
        self.servables = {}  # version -> VersionProcess; replaced as a whole, so readers need no lock
        self._failed = set()

    def wanted(self, versions):
        """The versions to serve among those on disk, by the version policy (TF Serving's default: the latest)."""
        choice = self.policy.WhichOneof("policy_choice")
        if choice == "all":
            return set(versions)
        if choice == "specific":
            return set(versions) & set(self.policy.specific.versions)
        return set(sorted(versions)[-max(self.policy.latest.num_versions, 1):])

    def poll(self):
        """Loads and warms up the versions the policy wants that are not served yet (or whose process ended: they
        answer 503 meanwhile), then swaps them in and retires the versions it no longer wants. A version that fails
        to load is not retried (nor counted as on disk)."""
        dead = {v for v, s in self.servables.items() if not s.alive}
        try:
            on_disk = [int(v) for v in os.listdir(self.base_path)
                       if v.isdigit() and os.path.exists(os.path.join(self.base_path, v, "saved_model.pb"))]
        except OSError as e:
            log.warning("%s: %s", self.name, e)
            return
        wanted = self.wanted([v for v in on_disk if v not in self._failed])
        loaded = {}
        for version in sorted(wanted - (set(self.servables) - dead)):
            try:
                loaded[version] = VersionProcess(self.name, version, os.path.join(self.base_path, str(version)),
                                                 **self.servable_options)
            except Exception:
                log.exception("%s: version %d failed to load; not serving it", self.name, version)
                self._failed.add(version)
            else:
                log.info("%s: serving version %d from %s", self.name, version, self.base_path)
        kept = {v: s for v, s in self.servables.items() if v in wanted and v not in dead}
        if loaded or len(kept) < len(self.servables):
            old, self.servables = self.servables, {**kept, **loaded}
            for version in sorted(set(old) - set(kept)):
                old[version].close()
                if version not in loaded:
                    log.info("%s: version %d unloaded", self.name, version)

    def get(self, version=None, label=None):
        servables = self.servables
        if label is not None:
            if label not in self.labels:
                raise RequestError(f"Unrecognized servable version label: {label}", 404)
            version = self.labels[label]
        if version is None and servables:
            return servables[max(servables)]
        if version not in servables:
            spec = f"Specific({self.name}, {version})" if version is not None else f"Latest({self.name})"
            raise RequestError(f"Servable not found for request: {spec}", 404)
        return servables[version]

    def status(self, version=None, label=None):
        """GetModelStatusResponse: every served version (or the one asked for) AVAILABLE."""
        versions = sorted(self.servables) if version is None and label is None else [self.get(version, label).version]
        if not versions:
            raise RequestError(f"Servable not found for request: Latest({self.name})", 404)
        response = get_model_status_pb2.GetModelStatusResponse()
        for v in versions:
            status = response.model_version_status.add(version=v)
            status.state = get_model_status_pb2.ModelVersionStatus.AVAILABLE
            status.status.SetInParent()  # error_code OK, error_message ""
        return response

    def close(self):
        for servable in self.servables.values():
            servable.close()


def remove_stale_exports(base_path):
    """Removes `tmp-*` directories a killed `tfglm export` left in `base_path` (untouched for STALE_EXPORT_S)."""
    for entry in os.scandir(base_path):
        if not (entry.name.startswith("tmp-") and entry.is_dir(follow_symlinks=False)):
            continue
        newest = max((os.path.getmtime(os.path.join(root, name)) for root, dirs, files in os.walk(entry.path)
                      for name in dirs + files), default=entry.stat().st_mtime)
        if time.time() - max(newest, entry.stat().st_mtime) > STALE_EXPORT_S:
            log.info("removing %s, left over from an interrupted export", entry.path)
            shutil.rmtree(entry.path, ignore_errors=True)
