"""Epoch seals (format 5): a finished epoch stays finished.

When the last unit of an epoch is committed, the build writes the epoch's seal, a group
``<cache>/seals/<EEEE>`` (outside the epoch's own folder, so deleting that folder leaves the
seal behind) whose attributes ``{"seal": {...}}`` name the manifest digest, the unit count
and the sha256 of every unit's commit record (:func:`commit_digest`). Readers tell epochs
apart by it (:func:`epoch_status`):

* **complete**: every unit committed (sealed, or finished by a build killed before sealing);
* **unfinished**: not sealed and some units missing: a build has not finished it;
* **damaged**: sealed, but its folder or a commit record is missing, or (on reading, in
  :func:`check_sealed`) a commit record is not the one it was sealed with.

Caches of formats 1-4 have no seals: a lost epoch of theirs cannot be told from an
unfinished one.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import zarr

from logitcache.errors import CorruptCacheError
from logitcache.storage.layout import REPAIR_HINT, count, hex64, list_names, numbered_entries
from logitcache.storage.manifest_schema import DIGEST_FORMAT, canonical_json

SEALS = "seals"


def seal_path(epoch: int) -> str:
    return f"{SEALS}/{epoch:04d}"


def commit_digest(record: dict) -> str:
    """sha256 (hex) of a commit record's canonical JSON (manifest_schema.canonical_json)."""
    return hashlib.sha256(canonical_json(record)).hexdigest()


def seal_record(manifest: str, records: list[dict]) -> dict:
    """The seal of an epoch whose units' commit records are ``records``, in shard order."""
    return {"manifest": manifest, "units": len(records), "commits": [commit_digest(r) for r in records]}


def sealed_epochs(url: str, storage_options: dict | None, format_version: int) -> list[int]:
    """The epochs with a seal, sorted (one listing); [] before format 5."""
    if format_version < DIGEST_FORMAT:
        return []
    return numbered_entries(list_names(url, SEALS, storage_options))


def write_seal(root: zarr.Group, epoch: int, seal: dict) -> None:
    """Write (or replace) ``epoch``'s seal: one group, one metadata write. Processes finishing
    an epoch together may both write it (the same document): neither fails."""
    seals = root.require_group(SEALS)  # created up front by CacheWriter.prepare_epochs
    name = f"{epoch:04d}"
    try:
        seals.create_group(name, attributes={"seal": seal})
    except zarr.errors.ContainsGroupError:  # sealed before (or just now, by another process)
        try:
            seals[name].attrs["seal"] = seal
        except Exception:  # noqa: BLE001 - a damaged seal: replace it whole
            seals.create_group(name, attributes={"seal": seal}, overwrite=True)


def remove_seal(root: zarr.Group, epoch: int) -> None:
    """Unseal ``epoch`` before its units are written again (a no-op when unsealed)."""
    if SEALS in root:
        del root[SEALS][f"{epoch:04d}"]


def read_seal(root: zarr.Group, epoch: int, url: str, num_shards: int, manifest: str | None) -> dict | None:
    """``epoch``'s seal, its fields checked, or None when it has none; a seal that exists but
    cannot be read or is malformed is damage (:class:`CorruptCacheError`)."""
    where = f"cache {url}: epoch {epoch}: seal {seal_path(epoch)}"
    try:
        group = root[seal_path(epoch)]
    except (KeyError, FileNotFoundError):
        return None
    except Exception as e:  # noqa: BLE001 - garbled metadata: any parser error
        raise CorruptCacheError(f"{where} is unreadable ({type(e).__name__}); {REPAIR_HINT}") from None
    return check_seal_record(group.attrs.asdict().get("seal"), epoch, url, num_shards, manifest)


def check_seal_record(seal, epoch: int, url: str, num_shards: int, manifest: str | None) -> dict:
    """``seal`` (``epoch``'s seal document), its fields checked; else :class:`CorruptCacheError`."""
    where = f"cache {url}: epoch {epoch}: seal {seal_path(epoch)}"
    if not isinstance(seal, dict) or set(seal) != {"manifest", "units", "commits"}:
        raise CorruptCacheError(f"{where} is not a table of manifest, units and commits; {REPAIR_HINT}")
    if seal["manifest"] != manifest:
        raise CorruptCacheError(f"{where}: field manifest is not this cache's manifest digest (sealed under "
                                f"another manifest); {REPAIR_HINT}")
    commits = seal["commits"]
    if not count(seal["units"]) or seal["units"] != num_shards or not isinstance(commits, list) \
            or len(commits) != num_shards or not all(map(hex64, commits)):
        raise CorruptCacheError(f"{where}: fields units and commits are not {num_shards} units' commit digests "
                                f"(the manifest's shard count); {REPAIR_HINT}")
    return seal


def check_sealed(seal: dict | None, epoch: int, records: list[dict], url: str) -> None:
    """Raise unless every unit's commit record (shard order) is the one ``seal`` names."""
    if seal is None:
        return
    for shard, (want, record) in enumerate(zip(seal["commits"], records)):
        if commit_digest(record) != want:
            raise CorruptCacheError(f"cache {url}: epoch {epoch}, unit {shard}: its commit record is not the one "
                                    f"the epoch was sealed with (replaced or edited); {REPAIR_HINT}")


@dataclass
class EpochStatus:
    """The epochs of a cache by state (see the module docstring), each list sorted."""

    complete: list[int] = field(default_factory=list)
    unfinished: list[int] = field(default_factory=list)
    damaged: dict[int, str] = field(default_factory=dict)  # epoch -> what is missing

    def damage_error(self, url: str) -> CorruptCacheError:
        """The one line for the first damaged epoch."""
        first = min(self.damaged)
        more = f" ({len(self.damaged)} damaged epochs)" if len(self.damaged) > 1 else ""
        return CorruptCacheError(f"cache {url}: epoch {first} was finished and sealed by its build, but "
                                 f"{self.damaged[first]}{more}; {REPAIR_HINT}")


def epoch_status(present: list[int], sealed: list[int], committed: dict[int, list[int]],
                 num_shards: int) -> EpochStatus:
    """The state of each epoch from the listings: epoch folders ``present``, seals ``sealed``
    and each present epoch's ``committed`` units."""
    status = EpochStatus()
    for e in sorted(set(present) | set(sealed)):
        units = committed.get(e, [])
        if e in sealed and e not in present:
            status.damaged[e] = f"its folder epochs/{e:04d} is missing"
        elif len(units) == num_shards:
            status.complete.append(e)
        elif e in sealed:
            lost = sorted(set(range(num_shards)) - set(units))
            status.damaged[e] = (f"commit records are missing for unit{'s' if len(lost) > 1 else ''} "
                                 f"{', '.join(map(str, lost[:5]))}{', ...' if len(lost) > 5 else ''}")
        else:
            status.unfinished.append(e)
    return status
