{{/*
Expand the name of the chart.
*/}}
{{- define "bace-token-broker.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Create a default fully qualified app name.
We truncate at 63 chars because some Kubernetes name fields are limited to this (by the DNS naming spec).
If release name contains chart name it will be used as a full name.
*/}}
{{- define "bace-token-broker.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Create chart name and version as used by the chart label.
*/}}
{{- define "bace-token-broker.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels every object carries (no component: the helm test pod must not match the selector).
*/}}
{{- define "bace-token-broker.commonLabels" -}}
helm.sh/chart: {{ include "bace-token-broker.chart" . }}
app.kubernetes.io/name: {{ include "bace-token-broker.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
Common labels of the broker's objects.
*/}}
{{- define "bace-token-broker.labels" -}}
{{ include "bace-token-broker.commonLabels" . }}
app.kubernetes.io/component: broker
{{- end }}

{{/*
Selector labels: the broker pods (not the helm test pod, whose component is "test").
*/}}
{{- define "bace-token-broker.selectorLabels" -}}
app.kubernetes.io/name: {{ include "bace-token-broker.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: broker
{{- end }}

{{/*
Labels of the helm test pod (the NetworkPolicy lets it reach the gRPC port).
*/}}
{{- define "bace-token-broker.testSelectorLabels" -}}
app.kubernetes.io/name: {{ include "bace-token-broker.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: test
{{- end }}

{{/*
The name of the service account (always created: it mounts no API token).
*/}}
{{- define "bace-token-broker.serviceAccountName" -}}
{{- include "bace-token-broker.fullname" . }}
{{- end }}

{{/*
The Secret the chart creates for accounts with inline credentials.
*/}}
{{- define "bace-token-broker.credentialsSecretName" -}}
{{- printf "%s-credentials" (include "bace-token-broker.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The broker image, tag defaulting to the chart's appVersion.
*/}}
{{- define "bace-token-broker.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion | toString) }}
{{- end }}

{{/* Where the config file and the account secrets are mounted. */}}
{{- define "bace-token-broker.configDir" -}}/etc/bace-token-broker{{- end }}
{{- define "bace-token-broker.secretsDir" -}}/var/run/secrets/bace{{- end }}
{{/* Where the store's Secret (encryption keys, Redis password) and its CA are mounted. */}}
{{- define "bace-token-broker.storeDir" -}}/var/run/secrets/bace-store{{- end }}
{{- define "bace-token-broker.storeCaDir" -}}/var/run/secrets/bace-store-ca{{- end }}
{{/* The port of store.redis.url (default 6379). */}}
{{- define "bace-token-broker.storePort" -}}
{{- $hostport := regexReplaceAll "^rediss?://([^/]*).*$" .Values.store.redis.url "${1}" }}
{{- $port := regexFind ":[0-9]+$" $hostport | trimPrefix ":" }}
{{- $port | default "6379" | int }}
{{- end }}
{{/* "true" when the Redis store is on (store.redis.url set), else empty. */}}
{{- define "bace-token-broker.storeEnabled" -}}
{{- if .Values.store.redis.url }}true{{ end }}
{{- end }}
{{/* Where the TLS Secret (tls.crt, tls.key, ca.crt) is mounted. */}}
{{- define "bace-token-broker.tlsDir" -}}/var/run/secrets/bace-tls{{- end }}
{{/*
Where the projected service-account token and cluster CA the broker fetches the JWKS with are
mounted (the usual place: the pod does not automount its token).
*/}}
{{- define "bace-token-broker.kubeApiDir" -}}/var/run/secrets/kubernetes.io/serviceaccount{{- end }}

{{/* "true" when TLS is on (tls.existingSecret set), else empty. */}}
{{- define "bace-token-broker.tlsEnabled" -}}
{{- if .Values.tls.existingSecret }}true{{ end }}
{{- end }}

{{/* "true" when the broker's auth section is rendered (kubernetes tokens or an allow list). */}}
{{- define "bace-token-broker.authEnabled" -}}
{{- if or .Values.auth.kubernetes.enabled .Values.auth.allow }}true{{ end }}
{{- end }}

{{/*
The port the probes (and the helm test) check health on: the plaintext health_listen port
with TLS on, else the gRPC port.
*/}}
{{- define "bace-token-broker.probePort" -}}
{{- if include "bace-token-broker.tlsEnabled" . }}
{{- int .Values.service.healthPort }}
{{- else }}
{{- int .Values.service.port }}
{{- end }}
{{- end }}

{{/* The ClusterRoleBinding to system:service-account-issuer-discovery (cluster-scoped). */}}
{{- define "bace-token-broker.issuerDiscoveryBindingName" -}}
{{- printf "%s-%s-issuer-discovery" .Release.Namespace (include "bace-token-broker.fullname" .) }}
{{- end }}

{{/* The readiness service name of the broker's gRPC health service. */}}
{{- define "bace-token-broker.readinessService" -}}bace.tokenbroker.v1.TokenBrokerService{{- end }}

{{/*
Volume name of an account's secret volume: a stable hash of the account name, since account
names may hold characters ('.', '_', capitals) that volume names may not. Call with the name.
*/}}
{{- define "bace-token-broker.accountVolume" -}}
{{- printf "account-%s" (sha256sum . | trunc 16) }}
{{- end }}

{{/*
Checks the values; fails the render with a message naming the value at fault.
Returns nothing.
*/}}
{{- define "bace-token-broker.validate" -}}
{{- if not .Values.accounts }}
{{- fail "accounts: at least one account is required (name -> {clientId, username, existingSecret} or {clientId, username, clientSecret, password})" }}
{{- end }}
{{- range $name, $a := .Values.accounts }}
{{- if not (regexMatch "^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$" $name) }}
{{- fail (printf "accounts.%s: invalid account name (1 to 128 of A-Z a-z 0-9 . _ -, not starting with '.')" $name) }}
{{- end }}
{{- if not (kindIs "map" $a) }}
{{- fail (printf "accounts.%s: must be a map with clientId, username and existingSecret or clientSecret+password" $name) }}
{{- end }}
{{- if not $a.clientId }}
{{- fail (printf "accounts.%s.clientId is required" $name) }}
{{- end }}
{{- if not $a.username }}
{{- fail (printf "accounts.%s.username is required" $name) }}
{{- end }}
{{- $inline := or $a.clientSecret $a.password }}
{{- if and $a.existingSecret $inline }}
{{- fail (printf "accounts.%s: give either existingSecret or clientSecret+password, not both" $name) }}
{{- end }}
{{- if not (or $a.existingSecret $inline) }}
{{- fail (printf "accounts.%s: credentials missing: set existingSecret (a Secret with keys client_secret and password) or clientSecret and password" $name) }}
{{- end }}
{{- if and $inline (not (and $a.clientSecret $a.password)) }}
{{- fail (printf "accounts.%s: inline credentials need both clientSecret and password" $name) }}
{{- end }}
{{- end }}
{{- $owned := dict "listen" "service.port" "metrics_listen" "metrics.enabled/metrics.port" "health_listen" "service.healthPort" "tls" "tls.existingSecret/tls.clientCA" "auth" "auth.kubernetes/auth.allow" "store" "store.redis" "accounts" "accounts" }}
{{- range $key := list "listen" "metrics_listen" "health_listen" "tls" "auth" "store" "accounts" }}
{{- if hasKey ($.Values.config | default dict) $key }}
{{- fail (printf "config.%s is set by the chart (from %s); remove it from config" $key (get $owned $key)) }}
{{- end }}
{{- end }}
{{- $tlsOn := include "bace-token-broker.tlsEnabled" . }}
{{- if and .Values.tls.clientCA (not $tlsOn) }}
{{- fail "tls.clientCA needs tls.existingSecret (a Secret with tls.crt, tls.key and ca.crt)" }}
{{- end }}
{{- if $tlsOn }}
{{- if eq (int .Values.service.healthPort) (int .Values.service.port) }}
{{- fail "service.healthPort must differ from service.port" }}
{{- end }}
{{- if and .Values.metrics.enabled (eq (int .Values.service.healthPort) (int .Values.metrics.port)) }}
{{- fail "service.healthPort must differ from metrics.port" }}
{{- end }}
{{- end }}
{{- if include "bace-token-broker.authEnabled" . }}
{{- if not .Values.auth.allow }}
{{- fail "auth.allow: list at least one {caller, accounts} when auth.kubernetes.enabled (an empty list denies every caller)" }}
{{- end }}
{{- if not (or .Values.auth.kubernetes.enabled (and $tlsOn .Values.tls.clientCA)) }}
{{- fail "auth.allow needs a way to identify callers: auth.kubernetes.enabled, or tls.existingSecret with tls.clientCA" }}
{{- end }}
{{- end }}
{{- with .Values.store.redis }}
{{- if .url }}
{{- if not (regexMatch "^rediss?://" .url) }}
{{- fail "store.redis.url must start with redis:// or rediss:// (TLS)" }}
{{- end }}
{{- if contains "@" .url }}
{{- fail "store.redis.url must not hold a user or password: set store.redis.username, and the password in store.redis.existingSecret" }}
{{- end }}
{{- if not .existingSecret }}
{{- fail "store.redis.existingSecret is required with store.redis.url (a Secret with the encryption key file, and the Redis password)" }}
{{- end }}
{{- if not .encryptionKeysKey }}
{{- fail "store.redis.encryptionKeysKey must name the key of the encryption key file in store.redis.existingSecret" }}
{{- end }}
{{- if and .caSecret (not (hasPrefix "rediss://" .url)) }}
{{- fail "store.redis.caSecret needs a rediss:// URL (TLS)" }}
{{- end }}
{{- else if or .existingSecret .caSecret .username }}
{{- fail "store.redis.existingSecret, caSecret and username need store.redis.url" }}
{{- end }}
{{- end }}
{{- if and .Values.serviceMonitor.enabled (not .Values.metrics.enabled) }}
{{- fail "serviceMonitor.enabled needs metrics.enabled" }}
{{- end }}
{{- if and .Values.networkPolicy.enabled (not .Values.networkPolicy.allowedClients) }}
{{- fail "networkPolicy.allowedClients: list at least one peer allowed to call the gRPC port when networkPolicy.enabled (an empty list would let no client in)" }}
{{- end }}
{{- if and .Values.metrics.enabled (eq (int .Values.metrics.port) (int .Values.service.port)) }}
{{- fail "metrics.port must differ from service.port" }}
{{- end }}
{{- $grace := include "bace-token-broker.shutdownGraceSeconds" . | int }}
{{- if not (kindIs "invalid" .Values.terminationGracePeriodSeconds) }}
{{- if le (int .Values.terminationGracePeriodSeconds) $grace }}
{{- fail (printf "terminationGracePeriodSeconds (%d) must be more than the broker's drain grace config.shutdown_grace (%d s)" (int .Values.terminationGracePeriodSeconds) $grace) }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The broker's drain grace (config.shutdown_grace, a humantime duration, default 10s) in whole
seconds, rounded up. Understands the units humantime accepts up to days and weeks
("10s", "1m 30s", "500ms", "2min"); fails on anything else.
*/}}
{{- define "bace-token-broker.shutdownGraceSeconds" -}}
{{- $text := "10s" }}
{{- if hasKey (.Values.config | default dict) "shutdown_grace" }}
{{- $text = toString .Values.config.shutdown_grace | trim }}
{{- end }}
{{- if not (regexMatch "^([0-9]+ *[a-zA-Zµ]+ *)+$" $text) }}
{{- fail (printf "config.shutdown_grace: %q is not a duration such as 10s, 1m or 1m 30s" $text) }}
{{- end }}
{{- $units := dict "ns" 0 "nsec" 0 "us" 0 "usec" 0 "µs" 0 "ms" 1 "msec" 1 "millis" 1 "s" 1000 "sec" 1000 "secs" 1000 "second" 1000 "seconds" 1000 "m" 60000 "min" 60000 "mins" 60000 "minute" 60000 "minutes" 60000 "h" 3600000 "hr" 3600000 "hrs" 3600000 "hour" 3600000 "hours" 3600000 "d" 86400000 "day" 86400000 "days" 86400000 "w" 604800000 "week" 604800000 "weeks" 604800000 }}
{{- $ms := 0 }}
{{- range $p := regexFindAll "[0-9]+ *[a-zA-Zµ]+" $text -1 }}
{{- $n := regexFind "^[0-9]+" $p | atoi }}
{{- $unit := regexReplaceAll "^[0-9]+ *" $p "" }}
{{- if not (hasKey $units $unit) }}
{{- fail (printf "config.shutdown_grace: unit %q in %q is not supported here (use ms, s, m, h, d)" $unit $text) }}
{{- end }}
{{- $ms = add $ms (mul $n (get $units $unit)) }}
{{- end }}
{{- div (add $ms 999) 1000 }}
{{- end }}

{{/*
terminationGracePeriodSeconds: the value when set (checked by "validate"), else the drain
grace plus 20 s for readiness to propagate and the process to exit.
*/}}
{{- define "bace-token-broker.terminationGracePeriodSeconds" -}}
{{- if kindIs "invalid" .Values.terminationGracePeriodSeconds }}
{{- add (include "bace-token-broker.shutdownGraceSeconds" . | int) 20 }}
{{- else }}
{{- int .Values.terminationGracePeriodSeconds }}
{{- end }}
{{- end }}

{{/*
The broker's config file (YAML): config merged with the keys the chart owns.
*/}}
{{- define "bace-token-broker.config" -}}
{{- $cfg := deepCopy (.Values.config | default dict) }}
{{- $_ := set $cfg "listen" (printf "0.0.0.0:%d" (int .Values.service.port)) }}
{{- if .Values.metrics.enabled }}
{{- $_ := set $cfg "metrics_listen" (printf "0.0.0.0:%d" (int .Values.metrics.port)) }}
{{- else }}
{{- /* Empty: the broker serves no metrics (absent would mean its default, 0.0.0.0:9090). */}}
{{- $_ := set $cfg "metrics_listen" "" }}
{{- end }}
{{- $secrets := include "bace-token-broker.secretsDir" . }}
{{- $accounts := dict }}
{{- range $name, $a := .Values.accounts }}
{{- $acc := dict "client_id" (toString $a.clientId) "username" (toString $a.username) "client_secret_file" (printf "%s/%s/client_secret" $secrets $name) "password_file" (printf "%s/%s/password" $secrets $name) }}
{{- with $a.tokenUrl }}
{{- $_ := set $acc "token_url" (toString .) }}
{{- end }}
{{- $_ := set $accounts $name $acc }}
{{- end }}
{{- $_ := set $cfg "accounts" $accounts }}
{{- if include "bace-token-broker.tlsEnabled" . }}
{{- $dir := include "bace-token-broker.tlsDir" . }}
{{- $tls := dict "cert_file" (printf "%s/tls.crt" $dir) "key_file" (printf "%s/tls.key" $dir) }}
{{- if .Values.tls.clientCA }}
{{- $_ := set $tls "client_ca_file" (printf "%s/ca.crt" $dir) }}
{{- end }}
{{- $_ := set $cfg "tls" $tls }}
{{- $_ := set $cfg "health_listen" (printf "0.0.0.0:%d" (int .Values.service.healthPort)) }}
{{- end }}
{{- if include "bace-token-broker.authEnabled" . }}
{{- $auth := dict }}
{{- with .Values.auth.kubernetes }}
{{- if .enabled }}
{{- $dir := include "bace-token-broker.kubeApiDir" $ }}
{{- $_ := set $auth "kubernetes" (dict "issuer" (toString .issuer) "jwks_url" (toString .jwksUrl) "audience" (toString .audience) "ca_file" (printf "%s/ca.crt" $dir) "bearer_token_file" (printf "%s/token" $dir)) }}
{{- end }}
{{- end }}
{{- $allow := list }}
{{- range .Values.auth.allow }}
{{- $accounts := list }}
{{- range .accounts }}
{{- $accounts = append $accounts (toString .) }}
{{- end }}
{{- $allow = append $allow (dict "caller" (toString .caller) "accounts" $accounts) }}
{{- end }}
{{- $_ := set $auth "allow" $allow }}
{{- $_ := set $cfg "auth" $auth }}
{{- end }}
{{- if include "bace-token-broker.storeEnabled" . }}
{{- $dir := include "bace-token-broker.storeDir" . }}
{{- with .Values.store.redis }}
{{- $redis := dict "url" (toString .url) "key_prefix" (toString .keyPrefix) "timeout" (toString .timeout) "lease" (toString .lease) "encryption_key_file" (printf "%s/encryption-keys" $dir) }}
{{- with .username }}
{{- $_ := set $redis "username" (toString .) }}
{{- end }}
{{- if .passwordKey }}
{{- $_ := set $redis "password_file" (printf "%s/redis-password" $dir) }}
{{- end }}
{{- if .caSecret }}
{{- $_ := set $redis "ca_file" (printf "%s/ca.crt" (include "bace-token-broker.storeCaDir" $)) }}
{{- end }}
{{- $_ := set $cfg "store" (dict "redis" $redis) }}
{{- end }}
{{- end }}
{{- toYaml $cfg }}
{{- end }}
