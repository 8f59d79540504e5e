"""The cluster's shared-memory directory (SharedBytes in value.proto).

Between processes of one host, an array of CASA_NODE_SHM_THRESHOLD bytes or
more (1 MiB by default; 0 turns this off) is written once by its producer
into a file of the cluster's directory under /dev/shm and mapped by its
consumer; the nodes in between forward only the file's name.

A producer writes `tmp-PID-RANDOM` (O_CREAT|O_EXCL, 0600) and renames it
`v-RANDOM` before sending; a consumer opens the file with O_NOFOLLOW relative
to the directory, checks it (regular, its own uid, long enough), maps it
copy-on-write (the array is writable; the file never changes) and unlinks
it: the memory lives as long as the array.
"""

import contextlib
import mmap
import os
import re
import secrets
import stat
import threading

THRESHOLD_VAR = "CASA_NODE_SHM_THRESHOLD"
DEFAULT_THRESHOLD = 1 << 20
TAG_FILE = "tag"

_NAME = re.compile(r"[A-Za-z0-9_.-]{1,100}\Z")


def threshold():
    """Arrays of at least this many bytes travel through shared memory; 0
    when it is off (CASA_NODE_SHM_THRESHOLD=0)."""
    text = os.environ.get(THRESHOLD_VAR, "").strip()
    if not text:
        return DEFAULT_THRESHOLD
    try:
        n = int(text)
    except ValueError:
        raise ValueError(f"{THRESHOLD_VAR}={text!r}: expected a number of bytes (0 turns shared memory off)") from None
    if n < 0:
        raise ValueError(f"{THRESHOLD_VAR}={text!r}: expected a number of bytes (0 turns shared memory off)")
    return n


def valid_name(name):
    """True for a name a reference may carry."""
    return isinstance(name, str) and bool(_NAME.match(name)) and not name.startswith(".")


class SharedError(ValueError):
    """A reference that cannot be read."""


class _Descriptor:
    """Closes its descriptor `fd` once, on close() or when collected."""

    __slots__ = ()

    def close(self):
        if getattr(self, "fd", None) is not None:
            os.close(self.fd)
            self.fd = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


class SharedDir(_Descriptor):
    """The cluster's directory, checked: this user's, closed to others, its
    file `tag` holding `tag`. Raises OSError or SharedError otherwise."""

    def __init__(self, path, tag, limit=None):
        self.path = path
        self.threshold = threshold() if limit is None else limit
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            if st.st_uid != os.getuid() or st.st_mode & 0o077:
                raise SharedError(f"{path} is not a private directory of this user")
            tfd = os.open(TAG_FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=fd)
            try:
                found = os.read(tfd, 256).decode("ascii", "replace")
            finally:
                os.close(tfd)
            if not tag or found != tag:
                raise SharedError(f"{path} is not this cluster's directory (another host?)")
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        self._local = threading.local()

    @contextlib.contextmanager
    def removing_on_error(self):
        """Files this thread writes inside the block are removed if the
        block raises (a value that fails to encode after an array was
        written, say)."""
        written = self._local.written = []
        try:
            yield
        except BaseException:
            for name in written:
                self.unlink(name)
            raise
        finally:
            self._local.written = None


    # -------------------------------------------------------------- producer

    def write_array(self, np, array):
        """Writes `array`'s elements in C order into a new file; returns its
        name."""
        tmp = f"tmp-{os.getpid()}-{secrets.token_hex(8)}"
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(tmp, flags, 0o600, dir_fd=self.fd)
        try:
            n = array.nbytes
            if array.flags.c_contiguous:
                view = memoryview(array.reshape(-1).view(np.uint8))
                done = 0
                while done < n:
                    done += os.write(fd, view[done:done + (1 << 30)])
            else:
                os.posix_fallocate(fd, 0, n)  # ENOSPC now, not SIGBUS later
                with mmap.mmap(fd, n, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE) as mm:
                    target = np.frombuffer(mm, dtype=array.dtype).reshape(array.shape)
                    np.copyto(target, array)
                    del target
            name = f"v-{secrets.token_hex(12)}"
            os.rename(tmp, name, src_dir_fd=self.fd, dst_dir_fd=self.fd)
            written = getattr(self._local, "written", None)
            if written is not None:
                written.append(name)
            return name
        except BaseException:
            self.unlink(tmp)
            raise
        finally:
            os.close(fd)

    # -------------------------------------------------------------- consumer

    def map(self, name, length):
        """The first `length` bytes of file `name`, mapped copy-on-write (a
        writable buffer); the file is unlinked. Raises SharedError saying
        what is wrong with a bad reference."""
        return self.claim(name, length).map()

    def claim(self, name, length):
        """A Claimed file: `name`, checked, opened and unlinked, whose
        map() gives a fresh copy-on-write mapping each time. Raises
        SharedError saying what is wrong with a bad reference."""
        if not valid_name(name):
            raise SharedError(f"invalid shared-memory file name {name!r}")
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=self.fd)
        except OSError as e:
            raise SharedError(f"shared-memory file {name!r}: {e.strerror}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise SharedError(f"shared-memory file {name!r}: not a regular file")
            if st.st_uid != os.getuid():
                raise SharedError(f"shared-memory file {name!r}: belongs to another user")
            if st.st_size < length:
                raise SharedError(
                    f"shared-memory file {name!r}: {st.st_size} bytes, shorter than the {length} of the value"
                )
        except BaseException:
            os.close(fd)
            raise
        self.unlink(name)
        return Claimed(fd, length)

    def unlink(self, name):
        """Removes file `name`; a missing one is fine."""
        if self.fd is None or not valid_name(name):
            return
        try:
            os.unlink(name, dir_fd=self.fd)
        except FileNotFoundError:
            pass


class Claimed(_Descriptor):
    """An unlinked shared-memory file held open: each map() is a private
    copy-on-write mapping of its first `length` bytes (writable; writes
    change neither the file nor other mappings). The memory goes when the
    file is closed and the last mapping is gone."""

    __slots__ = ("fd", "length")

    def __init__(self, fd, length):
        self.fd = fd
        self.length = length

    def map(self):
        if not self.length:
            return bytearray()
        return mmap.mmap(self.fd, self.length, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)

