"""GitLab mode: mailroom in MailRoom's place. Nothing else knows GitLab's file layout.

- ``settings``: gitlab.yml, secrets.yml and the encrypted settings → a ``Config``
  (``mailroom run --gitlab-config``);
- ``mail_room``: MailRoom's own YAML → a ``Config`` (``--mail-room-config``), after ``erb``
  (the Helm chart's ``<%= File.read(...).strip.to_json %>``, evaluated without Ruby);
- ``layout``: where relative paths lead on each way GitLab is installed;
- ``compose``: both go through ``parse_config``; errors told in the foreign file's words;
- ``encrypted`` and ``marshal``: ``Gitlab::EncryptedConfiguration`` files, read safely;
- ``redis``: where GitLab's queues Redis is (replicas, MailRoom's claims);
- ``check``: the GitLab steps of ``mailroom check``.
"""

from __future__ import annotations

from mailroom.gitlab.mail_room import is_mail_room_yaml, load_mail_room
from mailroom.gitlab.redis import GitLabRedis, find_queues_redis
from mailroom.gitlab.settings import load_gitlab

__all__ = ["GitLabRedis", "find_queues_redis", "is_mail_room_yaml", "load_gitlab", "load_mail_room"]
