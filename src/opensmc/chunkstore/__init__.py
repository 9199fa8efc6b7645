"""The chunk store: content-addressed, deduplicated blobs in pack files, and immutable snapshots.

Modules: ``backend`` (the object contract and the local directory backend),
``packs`` (the pack format), ``repository`` (writing and reading blobs),
``staging`` (a run's index of the disk it receives), ``snapshots`` (sealed
images), ``gc`` (mark and sweep), ``check`` (prove everything). The on-disk
format is ``docs/store-format.md``.
"""
