#!/bin/sh
# Add (or change) a user of the estate's Mosquitto: a board (username = its device_id),
# `gateway` or `central`.
#
#   deploy/mosquitto/add-user.sh H001             # generates and prints a password
#   deploy/mosquitto/add-user.sh H001 'secret'    # sets this one
#   PASSWORD_FILE=/etc/mosquitto/estate/passwd deploy/mosquitto/add-user.sh H001
#
# Needs mosquitto_passwd (package mosquitto-clients or mosquitto; or run it in the
# image: docker compose run --rm --no-deps mosquitto mosquitto_passwd ...). Then
# reload the broker: docker compose kill -s HUP mosquitto (or systemctl reload mosquitto).
set -eu

if [ $# -lt 1 ] || [ $# -gt 2 ]; then
    echo "usage: $0 USERNAME [PASSWORD]" >&2
    exit 2
fi
user=$1
case $user in
    *[!A-Za-z0-9_.-]*|'')
        echo "$0: username '$user' may hold only letters, digits, '_', '.', '-'" >&2
        exit 2 ;;
esac
file=${PASSWORD_FILE:-$(dirname "$0")/passwd}
if [ $# -eq 2 ]; then
    password=$2
else
    password=$(python3 -c 'import secrets; print(secrets.token_hex(16))')
    echo "$user: $password"
fi

[ -f "$file" ] || (umask 077 && : > "$file")
mosquitto_passwd -b "$file" "$user" "$password"
echo "$user added to $file; reload Mosquitto (SIGHUP) to apply" >&2
