/*
 * imagepipe-agent: a tiny QEMU guest agent for the test desktop.
 *
 * Speaks the QEMU guest agent protocol (JSON objects, one reply per command, each reply
 * ending in "\n") on the virtio-serial port named org.qemu.guest_agent.0, which is how
 * libvirt's qemu_agent.c talks to it: it first sends {"execute":"guest-sync",
 * "arguments":{"id":N}} and waits for {"return":N}, then the real command.
 *
 * Commands: guest-ping, guest-sync, guest-sync-delimited (reply preceded by the 0xFF
 * sentinel), guest-info, guest-get-users (from /run/users/<name>, written by the serial
 * login; the file holds the login time), guest-shutdown (no reply, like qemu-ga),
 * guest-set-time ({"time": ns since the epoch}, as libvirt's virDomainSetTime sends it) and
 * imagepipe-set-identity ({"hostname": NAME}): after a clone is restored from a warm
 * parent's saved memory, imagepipe tells the guest who it is and what time it is; the login
 * loops waiting at their prompt (/run/imagepipe-prompt/<tty> holds their process ids) get
 * SIGUSR1 and draw the screen and the prompt again, so they show the new name at once;
 * imagepipe-notify {"text": "..."} (a message to the user: written to the console and the
 * screen, and kept in /run/imagepipe-notice).
 * Anything else gets {"error":{"class":"CommandNotFound",...}}. A 0xFF byte from the host
 * discards any partial command, as in qemu-ga.
 *
 * Built by build-guest.sh with `gcc -static`.
 */
#define _GNU_SOURCE
#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define PORT_NAME "org.qemu.guest_agent.0"
#define MAX_COMMAND 65536
#define USERS_DIR "/run/users"
#define VERSION "imagepipe-tiny-1"
#define NOTICE_FILE "/run/imagepipe-notice"
#define PROMPT_DIR "/run/imagepipe-prompt"

static const char *const supported[] = {
    "guest-ping", "guest-sync", "guest-sync-delimited", "guest-info",
    "guest-get-users", "guest-shutdown", "guest-set-time", "imagepipe-set-identity",
    "imagepipe-notify",
};

static void pause_ms(long ms)
{
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

/* Find /dev/vportNpM whose /sys/class/virtio-ports/vportNpM/name is PORT_NAME. */
static int find_port(char *path, size_t size)
{
    DIR *dir = opendir("/sys/class/virtio-ports");
    struct dirent *entry;
    int found = 0;

    if (!dir)
        return 0;
    while (!found && (entry = readdir(dir)) != NULL) {
        char name_file[512];
        char name[128] = "";
        FILE *f;

        if (entry->d_name[0] == '.')
            continue;
        snprintf(name_file, sizeof name_file, "/sys/class/virtio-ports/%s/name", entry->d_name);
        f = fopen(name_file, "r");
        if (!f)
            continue;
        if (fgets(name, sizeof name, f)) {
            name[strcspn(name, "\n")] = '\0';
            if (strcmp(name, PORT_NAME) == 0) {
                snprintf(path, size, "/dev/%s", entry->d_name);
                found = 1;
            }
        }
        fclose(f);
    }
    closedir(dir);
    return found;
}

static int write_all(int fd, const char *data, size_t len)
{
    while (len > 0) {
        ssize_t n = write(fd, data, len);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        data += n;
        len -= (size_t)n;
    }
    return 0;
}

/* A growing string for replies. */
struct buf {
    char *data;
    size_t len, cap;
};

static void buf_add(struct buf *b, const char *text)
{
    size_t n = strlen(text);
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (b->len + n + 1 > cap)
            cap *= 2;
        char *grown = realloc(b->data, cap);
        if (!grown)
            abort();
        b->data = grown;
        b->cap = cap;
    }
    memcpy(b->data + b->len, text, n + 1);
    b->len += n;
}

/* Find `"key"` followed by ':' in text; return a pointer to the value, or NULL. */
static const char *find_value(const char *text, const char *key)
{
    char quoted[64];
    const char *p = text;

    snprintf(quoted, sizeof quoted, "\"%s\"", key);
    while ((p = strstr(p, quoted)) != NULL) {
        const char *q = p + strlen(quoted);
        while (isspace((unsigned char)*q))
            q++;
        if (*q == ':') {
            q++;
            while (isspace((unsigned char)*q))
                q++;
            return q;
        }
        p = q;
    }
    return NULL;
}

/* Copy a JSON string value (no escapes needed for command names) into out. */
static int string_value(const char *value, char *out, size_t size)
{
    size_t i = 0;
    if (!value || *value != '"')
        return 0;
    value++;
    while (*value && *value != '"' && i + 1 < size) {
        if (*value == '\\')
            return 0;
        out[i++] = *value++;
    }
    out[i] = '\0';
    return *value == '"';
}

/* Copy an integer token (as text, so 64-bit ids survive) into out. */
static int integer_value(const char *value, char *out, size_t size)
{
    size_t i = 0;
    if (!value)
        return 0;
    if (*value == '-')
        out[i++] = *value++;
    while (isdigit((unsigned char)*value) && i + 1 < size)
        out[i++] = *value++;
    out[i] = '\0';
    return i > 0 && isdigit((unsigned char)out[i - 1]);
}

static void error_reply(struct buf *out, const char *klass, const char *desc)
{
    buf_add(out, "{\"error\": {\"class\": \"");
    buf_add(out, klass);
    buf_add(out, "\", \"desc\": \"");
    buf_add(out, desc);
    buf_add(out, "\"}}\n");
}

static void users_reply(struct buf *out)
{
    DIR *dir = opendir(USERS_DIR);
    struct dirent *entry;
    int first = 1;

    buf_add(out, "{\"return\": [");
    while (dir && (entry = readdir(dir)) != NULL) {
        char file[512], stamp[64] = "0", item[512];
        FILE *f;
        const char *c;
        int safe = 1;

        if (entry->d_name[0] == '.')
            continue;
        for (c = entry->d_name; *c; c++)
            if (!isalnum((unsigned char)*c) && *c != '.' && *c != '_' && *c != '-')
                safe = 0;
        if (!safe)
            continue;
        snprintf(file, sizeof file, "%s/%s", USERS_DIR, entry->d_name);
        f = fopen(file, "r");
        if (f) {
            if (!fgets(stamp, sizeof stamp, f))
                strcpy(stamp, "0");
            fclose(f);
        }
        snprintf(item, sizeof item, "%s{\"user\": \"%s\", \"login-time\": %.1f}",
                 first ? "" : ", ", entry->d_name, strtod(stamp, NULL));
        buf_add(out, item);
        first = 0;
    }
    if (dir)
        closedir(dir);
    buf_add(out, "]}\n");
}

static void info_reply(struct buf *out)
{
    size_t i;
    buf_add(out, "{\"return\": {\"version\": \"" VERSION "\", \"supported_commands\": [");
    for (i = 0; i < sizeof supported / sizeof supported[0]; i++) {
        char item[160];
        snprintf(item, sizeof item,
                 "%s{\"name\": \"%s\", \"enabled\": true, \"success-response\": %s}",
                 i ? ", " : "", supported[i],
                 strcmp(supported[i], "guest-shutdown") == 0 ? "false" : "true");
        buf_add(out, item);
    }
    buf_add(out, "]}}\n");
}

static void shutdown_guest(const char *command)
{
    char mode[32] = "powerdown";
    const char *arguments = find_value(command, "arguments");

    if (arguments)
        string_value(find_value(arguments, "mode"), mode, sizeof mode);
    sync();
    /* busybox init: SIGUSR2 powers off, SIGUSR1 halts, SIGTERM reboots */
    if (strcmp(mode, "reboot") == 0)
        kill(1, SIGTERM);
    else if (strcmp(mode, "halt") == 0)
        kill(1, SIGUSR1);
    else
        kill(1, SIGUSR2);
}

/* Show a message to whoever is on the desktop: its console (serial) and its screen. */
static void notify_reply(struct buf *out, const char *command)
{
    static const char *const ttys[] = {"/dev/console", "/dev/tty0", "/dev/tty1"};
    const char *arguments = find_value(command, "arguments");
    char text[1024], line[1200];
    size_t i;
    FILE *f;

    if (!arguments || !string_value(find_value(arguments, "text"), text, sizeof text)) {
        error_reply(out, "GenericError", "Parameter 'text' is missing (plain text, no quotes)");
        return;
    }
    snprintf(line, sizeof line, "\r\n*** imagepipe: %s ***\r\n", text);
    for (i = 0; i < sizeof ttys / sizeof ttys[0]; i++) {
        int fd = open(ttys[i], O_WRONLY | O_NOCTTY | O_NONBLOCK);
        if (fd >= 0) {
            write_all(fd, line, strlen(line));
            close(fd);
        }
    }
    f = fopen(NOTICE_FILE, "a");
    if (f) {
        fprintf(f, "%s\n", text);
        fclose(f);
    }
    buf_add(out, "{\"return\": {}}\n");
}

static void set_time_reply(struct buf *out, const char *command)
{
    char ns[32];
    const char *arguments = find_value(command, "arguments");
    struct timespec ts;
    long long value;

    if (!arguments || !integer_value(find_value(arguments, "time"), ns, sizeof ns)) {
        error_reply(out, "GenericError", "Parameter 'time' is missing");
        return;
    }
    value = strtoll(ns, NULL, 10);
    ts.tv_sec = (time_t)(value / 1000000000LL);
    ts.tv_nsec = (long)(value % 1000000000LL);
    if (value < 0 || clock_settime(CLOCK_REALTIME, &ts) != 0) {
        error_reply(out, "GenericError", "Failed to set the time");
        return;
    }
    buf_add(out, "{\"return\": {}}\n");
}

/* The process id in file, when that process is still a login loop (not a reused id). */
static pid_t waiting_login_loop(const char *file)
{
    char text[32] = "", proc[64], cmdline[256];
    size_t n, i;
    long pid;
    FILE *f = fopen(file, "r");

    if (!f)
        return 0;
    if (!fgets(text, sizeof text, f))
        text[0] = '\0';
    fclose(f);
    pid = strtol(text, NULL, 10);
    if (pid <= 1)
        return 0;
    snprintf(proc, sizeof proc, "/proc/%ld/cmdline", pid);
    f = fopen(proc, "r");
    if (!f)
        return 0;
    n = fread(cmdline, 1, sizeof cmdline - 1, f);
    fclose(f);
    for (i = 0; i < n; i++)
        if (cmdline[i] == '\0')
            cmdline[i] = ' ';
    cmdline[n] = '\0';
    return strstr(cmdline, "login-loop") ? (pid_t)pid : 0;
}

/* Tell the login loops waiting at their prompt to draw it again, with the new name. */
static void redraw_prompts(void)
{
    DIR *dir = opendir(PROMPT_DIR);
    struct dirent *entry;

    while (dir && (entry = readdir(dir)) != NULL) {
        char file[512];
        pid_t pid;

        if (entry->d_name[0] == '.')
            continue;
        snprintf(file, sizeof file, "%s/%s", PROMPT_DIR, entry->d_name);
        pid = waiting_login_loop(file);
        if (pid > 0)
            kill(pid, SIGUSR1);
    }
    if (dir)
        closedir(dir);
}

static void set_identity_reply(struct buf *out, const char *command)
{
    char name[64];
    const char *arguments = find_value(command, "arguments");
    const char *c;

    if (!arguments || !string_value(find_value(arguments, "hostname"), name, sizeof name)
        || !name[0]) {
        error_reply(out, "GenericError", "Parameter 'hostname' is missing");
        return;
    }
    for (c = name; *c; c++)
        if (!isalnum((unsigned char)*c) && *c != '.' && *c != '-' && *c != '_') {
            error_reply(out, "GenericError", "Parameter 'hostname' is not a host name");
            return;
        }
    if (sethostname(name, strlen(name)) != 0) {
        error_reply(out, "GenericError", "Failed to set the host name");
        return;
    }
    redraw_prompts();
    buf_add(out, "{\"return\": {}}\n");
}

/* Handle one complete JSON object; write the reply (if any) to fd. */
static void handle(int fd, const char *command)
{
    struct buf out = {0};
    char name[128], id[32];

    if (!string_value(find_value(command, "execute"), name, sizeof name)) {
        error_reply(&out, "GenericError", "Expected 'execute' in the guest agent command");
    } else if (strcmp(name, "guest-ping") == 0) {
        buf_add(&out, "{\"return\": {}}\n");
    } else if (strcmp(name, "guest-sync") == 0 || strcmp(name, "guest-sync-delimited") == 0) {
        const char *arguments = find_value(command, "arguments");
        if (!arguments || !integer_value(find_value(arguments, "id"), id, sizeof id)) {
            error_reply(&out, "GenericError", "Parameter 'id' is missing");
        } else {
            if (name[10] == '-')
                buf_add(&out, "\xff");
            buf_add(&out, "{\"return\": ");
            buf_add(&out, id);
            buf_add(&out, "}\n");
        }
    } else if (strcmp(name, "guest-info") == 0) {
        info_reply(&out);
    } else if (strcmp(name, "guest-get-users") == 0) {
        users_reply(&out);
    } else if (strcmp(name, "guest-shutdown") == 0) {
        shutdown_guest(command);
    } else if (strcmp(name, "guest-set-time") == 0) {
        set_time_reply(&out, command);
    } else if (strcmp(name, "imagepipe-set-identity") == 0) {
        set_identity_reply(&out, command);
    } else if (strcmp(name, "imagepipe-notify") == 0) {
        notify_reply(&out, command);
    } else {
        char desc[256];
        snprintf(desc, sizeof desc, "The command %s has not been found", name);
        error_reply(&out, "CommandNotFound", desc);
    }
    if (out.len)
        write_all(fd, out.data, out.len);
    free(out.data);
}

/* Split the byte stream into JSON objects by counting braces outside strings. */
struct framer {
    char text[MAX_COMMAND];
    size_t len;
    int depth, in_string, escaped;
};

static void framer_reset(struct framer *f)
{
    f->len = 0;
    f->depth = f->in_string = f->escaped = 0;
}

static void feed(struct framer *f, int fd, const unsigned char *data, size_t n)
{
    size_t i;
    for (i = 0; i < n; i++) {
        unsigned char c = data[i];
        if (c == 0xFF) {
            framer_reset(f);
            continue;
        }
        if (f->depth == 0 && c != '{')
            continue;
        if (f->len + 1 >= sizeof f->text) {
            framer_reset(f);
            continue;
        }
        f->text[f->len++] = (char)c;
        if (f->in_string) {
            if (f->escaped)
                f->escaped = 0;
            else if (c == '\\')
                f->escaped = 1;
            else if (c == '"')
                f->in_string = 0;
        } else if (c == '"') {
            f->in_string = 1;
        } else if (c == '{') {
            f->depth++;
        } else if (c == '}' && --f->depth == 0) {
            f->text[f->len] = '\0';
            handle(fd, f->text);
            framer_reset(f);
        }
    }
}

int main(void)
{
    static struct framer framer;
    char path[600];
    unsigned char chunk[4096];
    int fd = -1;

    signal(SIGPIPE, SIG_IGN);
    for (;;) {
        if (fd < 0) {
            if (!find_port(path, sizeof path) || (fd = open(path, O_RDWR)) < 0) {
                pause_ms(200);
                continue;
            }
            framer_reset(&framer);
        }
        ssize_t n = read(fd, chunk, sizeof chunk);
        if (n > 0) {
            feed(&framer, fd, chunk, (size_t)n);
        } else if (n == 0 || errno == EAGAIN) {
            /* virtio-serial reads return 0 while no host is connected: wait a little */
            pause_ms(100);
        } else if (errno != EINTR) {
            close(fd);
            fd = -1;
            pause_ms(200);
        }
    }
}
