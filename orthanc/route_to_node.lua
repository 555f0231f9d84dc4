-- Route every stable study to the ACWI node (the "acwi" entry of
-- DicomModalities), without ever sending the node its own results back.
--
-- Which instances are the node's own output?  An instance is skipped when
-- EITHER of these holds:
--
--   1. its RemoteAET metadata (the calling AE title of the association that
--      delivered it, recorded by Orthanc for every instance received over
--      DICOM) equals the AE title of the "acwi" modality, i.e. the node's AE
--      title (compared without case, like Orthanc's default
--      "StrictAetComparison": false); or
--   2. its series' Manufacturer (0008,0070) is "ACWI Node", which the node
--      writes into every result object it creates.
--
-- Criterion 1 needs no cooperation from the result objects but only works
-- for results delivered by DICOM from the node itself; criterion 2 also
-- covers results that reach this Orthanc another way (STOW-RS, REST upload,
-- relayed by another PACS).  Either one alone is enough to stop a loop, so
-- both are applied.  The results' SeriesNumber (9901/9902) is deliberately
-- NOT used: modalities are free to use those numbers for their own series.
--
-- Loop guard: every instance that was forwarded successfully is tagged with
-- the user metadata "AcwiForwarded" (declared in "UserMetadata" of
-- orthanc.json).  When the node's results arrive in the same study, the
-- study becomes stable again and this callback runs again; instances already
-- tagged are not sent a second time, so a study is never bounced back and
-- forth.  An instance replaced by a new version (OverwriteInstances) loses
-- the tag and is forwarded again, which is intended: the content changed.
--
-- Log lines only contain Orthanc identifiers (hashes) and counts, never
-- patient data.

local NODE_MODALITY = 'acwi'
local NODE_MANUFACTURER = 'ACWI Node'
local FORWARDED_METADATA = 'AcwiForwarded'

local function Trim(value)
  if value == nil then
    return ''
  end
  return (string.gsub(tostring(value), '^%s*(.-)%s*$', '%1'))
end

local function GetJson(uri)
  local answer = RestApiGet(uri)
  if answer == nil then
    return nil
  end
  return ParseJson(answer)
end

-- The node's AE title, as configured for the "acwi" modality.
local function NodeAet()
  local modality = GetJson('/modalities/' .. NODE_MODALITY .. '/configuration')
  if modality == nil then
    return nil
  end
  return string.upper(Trim(modality['AET']))
end

function OnStableStudy(studyId, tags, metadata)
  local nodeAet = NodeAet()
  if nodeAet == nil or nodeAet == '' then
    print('ACWI routing: modality "' .. NODE_MODALITY .. '" is not configured; study '
          .. studyId .. ' not forwarded')
    return
  end

  local seriesList = GetJson('/studies/' .. studyId .. '/series')
  if seriesList == nil then
    print('ACWI routing: study ' .. studyId .. ' disappeared before routing')
    return
  end

  local toSend = {}
  local fromNode = 0
  local alreadyForwarded = 0

  for _, series in ipairs(seriesList) do
    local manufacturer = Trim(series['MainDicomTags']['Manufacturer'])
    for _, instanceId in ipairs(series['Instances']) do
      local instanceMetadata = GetJson('/instances/' .. instanceId .. '/metadata?expand') or {}
      if manufacturer == NODE_MANUFACTURER
        or string.upper(Trim(instanceMetadata['RemoteAET'])) == nodeAet then
        fromNode = fromNode + 1
      elseif instanceMetadata[FORWARDED_METADATA] ~= nil then
        alreadyForwarded = alreadyForwarded + 1
      else
        table.insert(toSend, instanceId)
      end
    end
  end

  if #toSend == 0 then
    print('ACWI routing: study ' .. studyId .. ': nothing to forward ('
          .. fromNode .. ' node result(s), ' .. alreadyForwarded .. ' already forwarded)')
    return
  end

  local request = {}
  request['Resources'] = toSend
  request['Synchronous'] = true
  local answer = RestApiPost('/modalities/' .. NODE_MODALITY .. '/store',
                             DumpJson(request, true))
  if answer == nil then
    print('ACWI routing: study ' .. studyId .. ': C-STORE of ' .. #toSend
          .. ' instance(s) to "' .. NODE_MODALITY .. '" FAILED (see the job list)')
    return
  end

  local stamp = os.date('!%Y-%m-%dT%H:%M:%SZ')
  for _, instanceId in ipairs(toSend) do
    RestApiPut('/instances/' .. instanceId .. '/metadata/' .. FORWARDED_METADATA, stamp)
  end
  print('ACWI routing: study ' .. studyId .. ': forwarded ' .. #toSend .. ' instance(s), skipped '
        .. fromNode .. ' node result(s) and ' .. alreadyForwarded .. ' already forwarded')
end

print('ACWI routing script loaded')
