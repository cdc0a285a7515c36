#!/bin/sh
# Print bales-stream's Redis ACL file (users default, producer, consumer, admin) from
# users.acl.in, for redis-server --aclfile. Passwords come from the environment and are
# written only as SHA-256 hashes:
#
#   BALES_PRODUCER_PASSWORD=... BALES_CONSUMER_PASSWORD=... BALES_ADMIN_PASSWORD=... \
#     deploy/redis/make-users-acl.sh > /etc/redis/users.acl
#
# KEY_PREFIX and QUEUE_NAME (the service's settings; defaults bales and requests) choose
# the key patterns. Then: redis-server --aclfile /etc/redis/users.acl (or ACL LOAD).
set -eu

sha256() {
  if command -v sha256sum >/dev/null 2>&1; then
    printf '%s' "$1" | sha256sum | cut -d' ' -f1
  else
    printf '%s' "$1" | shasum -a 256 | cut -d' ' -f1
  fi
}

prefix=${KEY_PREFIX:-bales}
queue=${QUEUE_NAME:-requests}
for name in "$prefix" "$queue"; do
  case $name in
    *[!A-Za-z0-9._-]* | '') echo "make-users-acl.sh: $name: use [A-Za-z0-9._-] only" >&2; exit 2 ;;
  esac
done
producer=$(sha256 "${BALES_PRODUCER_PASSWORD:?set BALES_PRODUCER_PASSWORD}")
consumer=$(sha256 "${BALES_CONSUMER_PASSWORD:?set BALES_CONSUMER_PASSWORD}")
admin=$(sha256 "${BALES_ADMIN_PASSWORD:?set BALES_ADMIN_PASSWORD}")

sed -e '/^#/d' -e '/^[[:space:]]*$/d' \
    -e "s/{{P}}/$prefix/g" -e "s/{{Q}}/$queue/g" \
    -e "s/{{PRODUCER_SHA256}}/$producer/" -e "s/{{CONSUMER_SHA256}}/$consumer/" \
    -e "s/{{ADMIN_SHA256}}/$admin/" \
    "$(dirname "$0")/users.acl.in"
