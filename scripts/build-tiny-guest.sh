#!/bin/bash
# Builds the tiny test/example guest from Debian's packages: a Debian cloud
# kernel (vmlinuz) and a busybox-static initramfs (initrd.gz) whose /init
# prints a banner, powers off on the ACPI power button, and runs a shell on
# the serial console. Nothing is downloaded from outside Debian's archive.
#
# Usage: scripts/build-tiny-guest.sh [OUTPUT_DIR]   (default /var/lib/virtkube/images/tiny)
# Idempotent: an existing kernel is kept; the initramfs is rebuilt when this
# script changes.
set -euo pipefail
OUT=${1:-/var/lib/virtkube/images/tiny}
HERE=$(cd "$(dirname "$0")" && pwd)
log() { echo "[build-tiny-guest] $*"; }

need=()
for p in busybox-static cpio; do dpkg -s "$p" >/dev/null 2>&1 || need+=("$p"); done
if [ ${#need[@]} -gt 0 ]; then
  log "installing ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

mkdir -p "$OUT"
chmod 755 "$OUT"
if [ ! -s "$OUT/vmlinuz" ] || [ ! -s "$OUT/modules/virtio_net.ko" ]; then
  [ -n "$(apt-cache depends linux-image-cloud-amd64 2>/dev/null)" ] || apt-get update -qq
  pkg=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-/ {print $2; exit}')
  [ -n "$pkg" ] || { log "cannot resolve linux-image-cloud-amd64 to a kernel package"; exit 1; }
  log "downloading $pkg"
  work=$(mktemp -d)
  (cd "$work" && apt-get download -q "$pkg" >/dev/null)
  dpkg-deb -x "$work"/*.deb "$work/root"
  install -m 0644 "$work"/root/boot/vmlinuz-* "$OUT/vmlinuz"
  # The ACPI power button and evdev are modules in the cloud kernel; busybox
  # acpid needs both to see the button that `virsh shutdown` presses. pvpanic
  # reports a kernel panic to QEMU (ACPI device QEMU0001, the template's
  # features.pvpanic), so a crash is seen as one.
  mkdir -p "$OUT/modules"
  # virtio (PCI) and virtio-blk let the guest see disks, e.g. those a VM
  # image carries and the shim passes as file descriptors; isofs reads the
  # cloud-init seed the shim builds; vfat (UTF-8 names by default) the
  # bootable disk of images/disk; virtio_net (with failover) a NIC.
  for m in drivers/acpi/button.ko drivers/input/evdev.ko \
    drivers/misc/pvpanic/pvpanic.ko drivers/misc/pvpanic/pvpanic-mmio.ko \
    drivers/virtio/virtio.ko drivers/virtio/virtio_ring.ko \
    drivers/virtio/virtio_pci_modern_dev.ko drivers/virtio/virtio_pci_legacy_dev.ko \
    drivers/virtio/virtio_pci.ko drivers/block/virtio_blk.ko \
    drivers/cdrom/cdrom.ko fs/isofs/isofs.ko fs/fat/fat.ko fs/fat/vfat.ko \
    fs/nls/nls_cp437.ko fs/nls/nls_ascii.ko fs/nls/nls_utf8.ko \
    net/core/failover.ko drivers/net/net_failover.ko drivers/net/virtio_net.ko; do
    install -m 0644 "$work"/root/lib/modules/*/kernel/$m "$OUT/modules/"
  done
  rm -rf "$work"
fi

stamp=$(sha256sum "$HERE/build-tiny-guest.sh" | cut -c1-16)
if [ ! -s "$OUT/initrd.gz" ] || [ "$(cat "$OUT/initrd.stamp" 2>/dev/null)" != "$stamp" ]; then
  log "building the busybox initramfs"
  root=$(mktemp -d)
  mkdir -p "$root"/{bin,sbin,etc,proc,sys,dev,tmp,root,usr/bin,usr/sbin,etc/acpi/PWRF}
  cp /bin/busybox "$root/bin/busybox"
  mkdir -p "$root/lib/modules"
  cp "$OUT"/modules/*.ko "$root/lib/modules/"
  for applet in $("$root/bin/busybox" --list); do
    [ -e "$root/bin/$applet" ] || ln -s busybox "$root/bin/$applet"
  done
  cat > "$root/init" <<'INIT'
#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
# ACPI power button -> clean poweroff: busybox acpid reads the button's
# input device and runs /etc/acpi/PWRF/00000080.
insmod /lib/modules/evdev.ko 2>/dev/null
insmod /lib/modules/button.ko 2>/dev/null
insmod /lib/modules/pvpanic.ko 2>/dev/null
insmod /lib/modules/pvpanic-mmio.ko 2>/dev/null
for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk; do
  insmod /lib/modules/$m.ko 2>/dev/null
done
printf '#!/bin/sh\necho "virtkube-tiny: power button pressed, powering off"\nsync\npoweroff -f\n' > /etc/acpi/PWRF/00000080
chmod +x /etc/acpi/PWRF/00000080
for _ in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20; do
  grep -q "Power Button" /proc/bus/input/devices 2>/dev/null && break
  sleep 0.1
done
sleep 0.1
# -d: log to stderr; without it acpid exits for want of /var/log/acpid.log.
case " $(cat /proc/cmdline) " in
  *" virtkube.ignore-acpi "*) echo "virtkube-tiny: ignoring ACPI (no acpid)" ;;
  *) acpid -d -c /etc/acpi >/dev/null 2>&1 & ;;
esac
echo "virtkube-tiny: booted ($(uname -r)), $(grep -c ^processor /proc/cpuinfo) cpu(s)"
# The display (VGA text, when the template has graphics): a banner that a
# screenshot shows in its top rows, on a black screen.
if [ -c /dev/tty1 ]; then
  {
    printf '\033[2J\033[H'
    for _ in 1 2 3 4; do echo "################ VIRTKUBE-TINY ON THE SCREEN ################"; done
    echo "virtkube-tiny: booted ($(uname -r))"
  } > /dev/tty1 2>/dev/null
fi
# The disks (virtio-blk PCI devices, legacy 0x1001 or modern 0x1042): their
# drivers bind and their device nodes appear a moment after the modules load.
disks=$(cat /sys/bus/pci/devices/*/device 2>/dev/null | grep -cxE '0x1001|0x1042')
for _ in $(seq 1 100); do
  [ "$(ls /dev/vd? 2>/dev/null | wc -l)" -ge "$disks" ] && break
  sleep 0.1
done
# The first disk's first line, which the tests write, if it is text (not
# the zeros of the cloud-init seed or the boot sector of a bootable disk).
if [ -b /dev/vda ]; then
  first=$(head -c 128 /dev/vda | head -n 1 | tr -d '\000')
  # (busybox tr has no [:print:]: what is left after deleting the printable
  # ASCII range must be nothing.)
  [ -n "$first" ] && [ -z "$(printf '%s' "$first" | tr -d ' -~')" ] &&
    echo "virtkube-tiny: vda says: $first"
fi
# Cloud-init's NoCloud seed, a disk labelled cidata. In place of cloud-init,
# the tiny guest takes its hostname from the meta-data and runs a user-data
# script (#!), printing each line it prints.
# (This busybox has no blkid: the label is read from the ISO 9660 volume
# descriptor itself, 40 bytes into sector 16.)
insmod /lib/modules/cdrom.ko 2>/dev/null
insmod /lib/modules/isofs.ko 2>/dev/null
for dev in /dev/vd?; do
  if [ "$(dd if="$dev" bs=1 skip=32808 count=6 2>/dev/null)" = cidata ]; then
    mkdir -p /cidata && mount -t iso9660 -o ro "$dev" /cidata && break
  fi
done
if [ -f /cidata/meta-data ]; then
  field() { sed -n "s/.*\"$1\": *\"\([^\"]*\)\".*/\1/p" /cidata/meta-data; }
  name=$(field local-hostname)
  [ -n "$name" ] && hostname "$name"
  echo "virtkube-tiny: cloud-init seed: instance-id $(field instance-id), hostname $(hostname)"
  case "$(head -c 2 /cidata/user-data)" in
    '#!') cp /cidata/user-data /tmp/user-data && chmod +x /tmp/user-data &&
      /tmp/user-data 2>&1 | sed 's/^/virtkube-tiny: user-data: /' ;;
    *) echo "virtkube-tiny: user-data: $(head -n 1 /cidata/user-data)" ;;
  esac
fi
# The network: a virtio NIC, configured by DHCP (busybox udhcpc, whose
# script sets the address, the route and the resolver), then a web server
# (busybox httpd on port 80) answering with the guest's hostname.
for m in failover net_failover virtio_net; do insmod /lib/modules/$m.ko 2>/dev/null; done
if grep -qxE '0x1000|0x1041' /sys/bus/pci/devices/*/device 2>/dev/null; then
  for _ in $(seq 1 50); do [ -e /sys/class/net/eth0 ] && break; sleep 0.1; done
fi
if [ -e /sys/class/net/eth0 ]; then
  ip link set lo up
  ip link set eth0 up
  mkdir -p /usr/share/udhcpc /www
  cat > /usr/share/udhcpc/default.script <<'DHCP'
#!/bin/sh
case "$1" in
  deconfig) ip addr flush dev "$interface" ;;
  bound|renew)
    ip addr flush dev "$interface"
    ip addr add "$ip/${mask:-24}" dev "$interface"
    [ -n "$router" ] && ip route replace default via "${router%% *}" dev "$interface"
    : > /etc/resolv.conf
    for d in $dns; do echo "nameserver $d" >> /etc/resolv.conf; done
    [ -n "$search" ] && echo "search $search" >> /etc/resolv.conf
    # The pod's name, unless the cloud-init seed named the guest.
    [ -n "$hostname" ] && [ "$(hostname)" = "(none)" ] && hostname "$hostname"
    echo "virtkube-tiny: eth0 has $ip/${mask:-24} by DHCP (router ${router:-none})" ;;
esac
DHCP
  chmod +x /usr/share/udhcpc/default.script
  udhcpc -i eth0 -q -n -t 10 -T 1 -s /usr/share/udhcpc/default.script 2>/dev/null || echo "virtkube-tiny: eth0 got no address by DHCP"
  echo "virtkube-tiny: hello from $(hostname)" > /www/index.html
  httpd -p 80 -h /www && echo "virtkube-tiny: serving http on port 80"
fi
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    virtkube.tick) ( n=0; while true; do n=$((n + 1))
        echo "virtkube-tiny: tick $n at uptime $(cut -d' ' -f1 /proc/uptime)"; sleep 1; done ) & ;;
    virtkube.bigfile) head -c 8388608 /dev/zero > /www/big && echo "virtkube-tiny: serving /big (8 MiB)" ;;
    virtkube.poweroff) echo "virtkube-tiny: powering off as asked on the command line"; sleep 3; poweroff -f ;;
    virtkube.panic) echo "virtkube-tiny: panicking as asked on the command line"; sleep 3; echo c > /proc/sysrq-trigger ;;
    virtkube.fetch=*) url=${arg#virtkube.fetch=}
      echo "virtkube-tiny: fetched $url: $(timeout 10 wget -q -O - "$url" 2>&1 | head -n 1)" ;;
    virtkube.ddread) s=$(cut -d' ' -f1 /proc/uptime); dd if=/dev/vda of=/dev/null bs=1M 2>/dev/null
      e=$(cut -d' ' -f1 /proc/uptime)
      echo "virtkube-tiny: read vda in $(awk "BEGIN {printf \"%d\", ($e - $s) * 1000}") ms" ;;
    virtkube.note-on-boot-disk)
      # The boot disk of images/disk is a FAT file system: say who wrote
      # on it before, then sign it.
      for m in fat vfat nls_cp437 nls_ascii nls_utf8; do insmod /lib/modules/$m.ko 2>/dev/null; done
      mkdir -p /boot-disk && mount -t vfat /dev/vda /boot-disk && {
        if [ -f /boot-disk/note.txt ]; then
          echo "virtkube-tiny: the boot disk has a note: $(cat /boot-disk/note.txt)"
        else
          echo "virtkube-tiny: the boot disk has no note yet"
        fi
        echo "written by $(hostname)" > /boot-disk/note.txt && sync && umount /boot-disk &&
          echo "virtkube-tiny: left a note on the boot disk: written by $(hostname)"
      } ;;
    virtkube.scribble) echo "virtkube-disk:SCRIBBLED" | dd of=/dev/vda conv=notrunc 2>/dev/null && sync &&
      echo "virtkube-tiny: scribbled on vda: $(head -c 128 /dev/vda | head -n 1)" ;;
  esac
done
echo "virtkube-tiny: ready"
while true; do
  setsid cttyhack sh -l
  echo "virtkube-tiny: shell exited, starting another"
done
INIT
  chmod +x "$root/init"
  (cd "$root" && find . | cpio -o -H newc --quiet | gzip -9) > "$OUT/initrd.gz.tmp"
  mv "$OUT/initrd.gz.tmp" "$OUT/initrd.gz"
  chmod 0644 "$OUT/initrd.gz"
  echo "$stamp" > "$OUT/initrd.stamp"
  rm -rf "$root"
fi
log "ready: $OUT/vmlinuz $OUT/initrd.gz"
