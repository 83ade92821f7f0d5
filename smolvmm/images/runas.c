/* smolvmm-runas USER[:GROUP] PROGRAM [ARGS...]: run PROGRAM as an image's User, as container
 * runtimes read it: USER and GROUP are names (looked up in the image's /etc/passwd and
 * /etc/group) or numbers; without GROUP, a named user's primary group, else gid 0. A named
 * user also gets its supplementary groups. Built statically by smolvmm/images/agent.py. */
#define _GNU_SOURCE
#include <errno.h>
#include <grp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define MAX_GROUPS 64

static int number(const char *text, unsigned long *out) {
    char *end;
    if (!*text) return 0;
    errno = 0;
    *out = strtoul(text, &end, 10);
    return !*end && !errno && *out < 0xFFFFFFFFul;
}

/* The colon-separated fields of the line of PATH whose first field is NAME (or whose third
 * field is the number ID when NAME is NULL); 1 if found. glibc's static NSS is not used: it
 * would load the host's libraries at run time. */
static int lookup(const char *path, const char *name, unsigned long id, char *line, size_t size, char **fields, int count) {
    FILE *file = fopen(path, "r");
    if (!file) return 0;
    while (fgets(line, (int)size, file)) {
        line[strcspn(line, "\n")] = '\0';
        int n = 0;
        char *rest = line;
        while (n < count && rest) fields[n++] = strsep(&rest, ":");
        unsigned long value;
        if (n >= 3 && (name ? !strcmp(fields[0], name) : number(fields[2], &value) && value == id)) {
            fclose(file);
            return n;
        }
    }
    fclose(file);
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: smolvmm-runas USER[:GROUP] PROGRAM [ARGS...]\n");
        return 125;
    }
    char *user = argv[1], *group = strchr(user, ':');
    if (group) *group++ = '\0';
    char line[4096], name[256] = "";
    char *fields[7];
    unsigned long uid, gid = 0;
    if (number(user, &uid)) {
        if (lookup("/etc/passwd", NULL, uid, line, sizeof line, fields, 7) >= 4 && number(fields[3], &gid))
            snprintf(name, sizeof name, "%s", fields[0]);
        else
            gid = 0;
    } else if (lookup("/etc/passwd", user, 0, line, sizeof line, fields, 7) >= 4 && number(fields[2], &uid)
               && number(fields[3], &gid)) {
        snprintf(name, sizeof name, "%s", user);
    } else {
        fprintf(stderr, "smolvmm: no user %s in the image's /etc/passwd\n", user);
        return 125;
    }
    if (group && !number(group, &gid)) {
        if (!(lookup("/etc/group", group, 0, line, sizeof line, fields, 4) >= 3 && number(fields[2], &gid))) {
            fprintf(stderr, "smolvmm: no group %s in the image's /etc/group\n", group);
            return 125;
        }
    }
    gid_t groups[MAX_GROUPS];
    int count = 0;
    groups[count++] = (gid_t)gid;
    FILE *file = *name ? fopen("/etc/group", "r") : NULL;
    while (file && count < MAX_GROUPS && fgets(line, sizeof line, file)) {  /* supplementary groups */
        line[strcspn(line, "\n")] = '\0';
        int n = 0;
        char *rest = line;
        while (n < 4 && rest) fields[n++] = strsep(&rest, ":");
        unsigned long value;
        if (n < 4 || !number(fields[2], &value)) continue;
        for (char *member = strtok(fields[3], ","); member; member = strtok(NULL, ","))
            if (!strcmp(member, name) && value != gid) groups[count++] = (gid_t)value;
    }
    if (file) fclose(file);
    if (setgroups((size_t)count, groups) || setgid((gid_t)gid) || setuid((uid_t)uid)) {
        perror("smolvmm: cannot switch to the image's user");
        return 125;
    }
    execvp(argv[2], argv + 2);
    fprintf(stderr, "smolvmm: cannot run %s: %s\n", argv[2], strerror(errno));
    return errno == ENOENT ? 127 : 126;
}
